"""lowrank.ops.lora_mixed (one adapter per row) and its kernels against the fp64 reference, and
mixed batches of a patched model against PEFT's mixed batches (``adapter_names=``).

Op shapes are odd (M = 21 rows over leading dims 7 x 3, K = 97, N = 83; blocks are 16/64/128),
with three adapters of ranks 5, 16 and 3 padded to 16 and base rows (-1) among them."""

import copy
import math

import pytest
import torch
from helpers import load_tiny_4bit_llama, poisoned, randomize_adapters, tiny_model, token_ids

import lowrank
from lowrank import nf4, ops, reference
from lowrank.kernels import lora_mixed as mixed_kernels

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
K, N = 97, 83
RANKS = (5, 16, 3)
SCALINGS = (2.0, 0.5, 1.25)


def make_case(dtype, kind, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 3, K, generator=gen).to(device, dtype)
    w = torch.randn(N, K, generator=gen) * 0.05
    if kind == "dense":
        weight, state, dense = w.to(device, dtype), None, w.to(dtype).double()
    else:
        weight, state = nf4.quantize(w.to(device, dtype), blocksize=64, double_quant=kind == "nf4-nested")
        dense = nf4.dequantize(weight, state, dtype=torch.float32).double()
    lora_a = torch.zeros(len(RANKS), max(RANKS), K)
    lora_b = torch.zeros(len(RANKS), N, max(RANKS))
    for i, r in enumerate(RANKS):  # ranks below the largest padded with zeros
        lora_a[i, :r] = torch.randn(r, K, generator=gen) / math.sqrt(K)
        lora_b[i, :, :r] = torch.randn(N, r, generator=gen) * 0.1
    index = torch.tensor([[0, 1, -1], [2, 2, 0], [1, -1, -1], [0, 0, 0], [2, 1, 0], [1, 1, 2],
                          [-1, 0, 2]]).to(device)
    bias = torch.randn(N, generator=gen).to(device, dtype)
    return x, weight, state, dense, lora_a.to(device), lora_b.to(device), index, bias


def assert_close(actual, expected, dtype, what):
    assert actual.dtype == dtype and actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what}: NaN (an element left unwritten?)"
    error = ((actual.double() - expected).abs().max() / expected.abs().max()).item()
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e} > {TOLERANCE[dtype]}"


# 21 rows: the tiled forward; 15: the decode path (at most DECODE_MAX_M rows, split over K).
@pytest.mark.parametrize("dtype, kind, rows", [
    (torch.float32, "dense", 21), (torch.float32, "dense", 15), (torch.float16, "dense", 15),
    (torch.bfloat16, "dense", 21), (torch.float32, "nf4", 15), (torch.bfloat16, "nf4-nested", 21),
    (torch.bfloat16, "nf4-nested", 15)])
def test_matches_reference(dtype, kind, rows, device):
    x, weight, state, dense, lora_a, lora_b, index, bias = make_case(dtype, kind, device)
    x, index = x[:rows // 3], index[:rows // 3]
    with torch.no_grad():
        y = ops.lora_mixed(x, weight, lora_a, lora_b, list(SCALINGS), index, bias=bias,
                           quant_state=state)
        expected = reference.lora_mixed(x.double(), dense, lora_a.double(), lora_b.double(),
                                        torch.tensor(SCALINGS), index, bias.double())
    assert_close(y, expected, dtype, f"{kind} {dtype}")
    # Each row is its own adapter's single-adapter LoRA linear (or the base alone).
    row = 4
    for j in range(3):
        i = index[row, j].item()
        single = reference.lora_linear(x[row, j].double(), dense, lora_a[max(i, 0)].double(),
                                       lora_b[max(i, 0)].double(), SCALINGS[i] if i >= 0 else 0.0,
                                       bias.double())
        assert_close(y[row, j], single, dtype, f"row {row}, {j}")


@pytest.mark.parametrize("rows", [21, mixed_kernels.DECODE_MAX_M])
def test_kernels_write_every_element(rows, device):
    """The launcher into NaN-poisoned S and Y: every element written (base rows' S as zeros)."""
    dtype = torch.float32
    x, weight, _, dense, lora_a, lora_b, index, bias = make_case(dtype, "dense", device)
    x2, index = x.reshape(-1, K)[:rows], index.reshape(-1)[:rows]
    s, y = poisoned((rows, max(RANKS)), dtype, device), poisoned((rows, N), dtype, device)
    mixed_kernels.lora_mixed_forward(x2, weight, lora_a, lora_b, torch.tensor(SCALINGS, device=device),
                                     index, bias, s, y)
    assert not s.isnan().any() and not y.isnan().any()
    assert (s[index == -1] == 0).all()
    expected = reference.lora_mixed(x2.double(), dense, lora_a.double(), lora_b.double(),
                                    torch.tensor(SCALINGS), index, bias.double())
    assert_close(y, expected, dtype, "y")


# The segmented (SGMV) path: a prefill-sized batch, rows grouped by adapter. 75 rows over four
# adapters: a segment of 66 rows (two tiles of 64), one of a single row, an empty one, the rest
# base rows; shuffled, so each segment's rows are scattered over the batch.
SEGMENTS = {0: 66, 1: 1, 2: 0, 3: 0, -1: 8}
SEGMENT_RANKS = RANKS + (7,)


def make_segment_case(dtype, kind, device, segments=SEGMENTS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, weight, state, dense, _, _, _, bias = make_case(dtype, kind, device, seed)
    rows = sum(segments.values())
    index = torch.tensor([a for a, count in segments.items() for _ in range(count)])
    index = index[torch.randperm(rows, generator=gen)]
    x = torch.randn(rows, K, generator=gen).to(device, dtype)
    lora_a = torch.zeros(len(SEGMENT_RANKS), max(SEGMENT_RANKS), K)
    lora_b = torch.zeros(len(SEGMENT_RANKS), N, max(SEGMENT_RANKS))
    for i, r in enumerate(SEGMENT_RANKS):
        lora_a[i, :r] = torch.randn(r, K, generator=gen) / math.sqrt(K)
        lora_b[i, :, :r] = torch.randn(N, r, generator=gen) * 0.1
    return x, weight, state, dense, lora_a.to(device), lora_b.to(device), index.to(device), bias


SEGMENT_SCALINGS = SCALINGS + (3.0,)


@pytest.mark.parametrize("segments", [SEGMENTS, {0: 64, 1: 1, 2: 65, 3: 3, -1: 0},
                                      {0: 0, 1: 0, 2: 0, 3: 0, -1: 17}, {2: 1, -1: 0}])
def test_segment_tiles_cover_each_row_once(segments):
    """Every row in exactly one tile, of its own adapter, at most BLOCK_M rows a tile; the table
    has one row per possible tile, the rest empty."""
    block_m = 64
    rows = sum(segments.values())
    index = torch.tensor([a for a, count in segments.items() for _ in range(count)])
    index = index[torch.randperm(rows, generator=torch.Generator().manual_seed(0))]
    adapters = max(segments) + 1
    order, tiles = mixed_kernels.segment_tiles(index, adapters, block_m)
    assert tiles.dtype == torch.int32
    assert tiles.shape == (math.ceil(rows / block_m) + adapters + 1, 3)
    seen = []
    for adapter, first, end in tiles.tolist():
        assert 0 <= end - first <= block_m
        tile_rows = order[first:end]
        assert (index[tile_rows] == adapter).all()
        seen += tile_rows.tolist()
    assert sorted(seen) == list(range(rows))
    # Tiles needed: a partial one at most per segment.
    assert sum(end > first for _, first, end in tiles.tolist()) == \
        sum(math.ceil(count / block_m) for count in segments.values())


@pytest.mark.parametrize("dtype, kind", [
    (torch.float32, "dense"), (torch.float16, "dense"), (torch.bfloat16, "dense"),
    (torch.float32, "nf4"), (torch.bfloat16, "nf4-nested")])
def test_segmented_path_matches_reference(dtype, kind, device):
    x, weight, state, dense, lora_a, lora_b, index, bias = make_segment_case(dtype, kind, device)
    assert mixed_kernels.segmented(x.shape[0], lora_a.shape[0])  # the path under test
    with torch.no_grad():
        y = ops.lora_mixed(x, weight, lora_a, lora_b, list(SEGMENT_SCALINGS), index, bias=bias,
                           quant_state=state)
        expected = reference.lora_mixed(x.double(), dense, lora_a.double(), lora_b.double(),
                                        torch.tensor(SEGMENT_SCALINGS), index, bias.double())
    assert_close(y, expected, dtype, f"{kind} {dtype}")
    one_row = (index == 1).nonzero().item()  # the one-row segment: its adapter's LoRA linear
    single = reference.lora_linear(x[one_row].double(), dense, lora_a[1].double(),
                                   lora_b[1].double(), SEGMENT_SCALINGS[1], bias.double())
    assert_close(y[one_row], single, dtype, "the one-row segment")


def test_segmented_kernels_write_every_element(device):
    """Into NaN-poisoned S and Y, without bias: every element written, base rows' S as zeros, and
    the same Y as the per-row path (gathered_forward) on the same batch."""
    dtype = torch.float32
    x, weight, _, dense, lora_a, lora_b, index, _ = make_segment_case(dtype, "dense", device)
    scalings = torch.tensor(SEGMENT_SCALINGS, device=device)
    s, y = poisoned((x.shape[0], lora_a.shape[1]), dtype, device), poisoned((x.shape[0], N), dtype, device)
    mixed_kernels.segmented_forward(x, weight, lora_a, lora_b, scalings, index, None, s, y)
    assert not s.isnan().any() and not y.isnan().any()
    assert (s[index == -1] == 0).all()
    s_rows, y_rows = poisoned(s.shape, dtype, device), poisoned(y.shape, dtype, device)
    mixed_kernels.gathered_forward(x, weight, lora_a, lora_b, scalings, index, None, s_rows, y_rows)
    torch.testing.assert_close(s, s_rows, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, y_rows, rtol=1e-5, atol=1e-5)


def test_op_passes_torch_library_checks_and_compiles(device):
    """The custom op's fake agrees with it (opcheck), and torch.compile traces lora_mixed whole."""
    x, weight, state, _, lora_a, lora_b, index, bias = make_case(torch.float32, "dense", device)
    x2, index2 = x.reshape(-1, K)[:15], index.reshape(-1)[:15]
    scalings = torch.tensor(SCALINGS, device=device)
    torch.library.opcheck(ops.lora_mixed_forward, (x2, *ops.FrozenWeight.of(weight, state).flat(),
                                                   lora_a, lora_b, scalings, index2, None))
    # The segmented path too (its launcher sorts the rows with torch ops inside the custom op).
    xs, ws, _, _, a_s, b_s, index_s, _ = make_segment_case(torch.float32, "dense", device)
    assert mixed_kernels.segmented(xs.shape[0], a_s.shape[0])
    torch.library.opcheck(ops.lora_mixed_forward, (xs, *ops.FrozenWeight.of(ws).flat(), a_s, b_s,
                                                   torch.tensor(SEGMENT_SCALINGS, device=device),
                                                   index_s, None))

    def forward(x, index):
        return ops.lora_mixed(x, weight, lora_a, lora_b, scalings, index, bias=bias,
                              quant_state=state, index_in_range=True)

    with torch.no_grad():
        eager = forward(x, index)
        compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")(x, index)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_bad_arguments_are_named(device):
    x, weight, _, _, lora_a, lora_b, index, bias = make_case(torch.float32, "dense", device)
    cases = [
        (dict(adapter_index=index.clamp(max=2) + 1), r"in \[-1, 3\)"),
        (dict(adapter_index=index[:-1]), "one entry per row"),
        (dict(adapter_index=index.float()), "int32 or int64"),
        (dict(lora_B=lora_b[:, :, :4]), "lora_B must be"),
        (dict(lora_A=lora_a[0]), "lora_A must be"),
        (dict(scalings=[1.0, 2.0]), "scalings must be 3"),
    ]
    for change, message in cases:
        args = dict(x=x, weight=weight, lora_A=lora_a, lora_B=lora_b, scalings=list(SCALINGS),
                    adapter_index=index, bias=bias) | change
        with torch.no_grad(), pytest.raises((ValueError, TypeError), match=message):
            ops.lora_mixed(**args)
    with pytest.raises(ValueError, match="inference only"):
        ops.lora_mixed(x, weight, lora_a.requires_grad_(), lora_b, list(SCALINGS), index)


# Mixed batches of a patched model vs PEFT's (adapter_names=, its masks over the batch).

def peft_model_with_three_adapters(tmp_path):
    """PEFT's Llama with adapters "x" (rank 4), "y" (rank 2, other targets) and "z" (rank 4),
    random weights, and a patched twin that loaded the same files."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama", blocks=1),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                              "down_proj"]),
                                adapter_name="x")
    peft_model.add_adapter("y", LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj", "o_proj"]))
    peft_model.add_adapter("z", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj",
                                                                               "down_proj"]))
    randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = tiny_model("llama", blocks=1)
    for name in ("x", "y", "z"):
        lowrank.load_adapter(ours, tmp_path / name, adapter_name=name)
    return peft_model.eval(), ours.eval()


def test_mixed_batch_matches_peft(tmp_path):
    peft_model, ours = peft_model_with_three_adapters(tmp_path)
    ids = token_ids(batch=5, length=3)
    names = ["y", "__base__", "x", "z", "y"]
    with torch.no_grad():
        expected = peft_model(input_ids=ids, adapter_names=names).logits
        with lowrank.mixed_batch(ours, names):
            actual = ours(ids).logits
        order = list(ours.lowrank_state.adapters)
        indices = torch.tensor([order.index(n) if n != "__base__" else -1 for n in names])
        with lowrank.mixed_batch(ours, indices):
            from_indices = ours(ids).logits
        # Only "y": the layers without it (q_proj, down_proj) run their base for every row.
        only_y = ["y", "__base__", "y", "__base__", "y"]
        expected_only_y = peft_model(input_ids=ids, adapter_names=only_y).logits
        with lowrank.mixed_batch(ours, only_y):
            actual_only_y = ours(ids).logits
        alone = ours(ids).logits  # outside the block: the active adapter again
        peft_model.set_adapter("x")
        expected_alone = peft_model(input_ids=ids).logits
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, f"relative error {error:.2e}"
    error = ((actual_only_y - expected_only_y).abs().max() / expected_only_y.abs().max()).item()
    assert error <= 1e-5, f"only y: relative error {error:.2e}"
    torch.testing.assert_close(from_indices, actual, rtol=0, atol=0)
    torch.testing.assert_close(alone, expected_alone, rtol=1e-5, atol=1e-5)


def test_prefill_mixed_batch_matches_peft(tmp_path, monkeypatch):
    """A prefill-sized batch (4 x 17 tokens) runs the segmented kernels in every LoRA layer it
    reaches, with PEFT's mixed-batch results."""
    peft_model, ours = peft_model_with_three_adapters(tmp_path)
    ids = token_ids(batch=4, length=17)
    names = ["x", "z", "__base__", "x"]
    segmented = []
    run_segmented = mixed_kernels.segmented_forward
    monkeypatch.setattr(mixed_kernels, "segmented_forward",
                        lambda *a: segmented.append(1) or run_segmented(*a))
    with torch.no_grad():
        expected = peft_model(input_ids=ids, adapter_names=names).logits
        with lowrank.mixed_batch(ours, names):
            actual = ours(ids).logits
    assert len(segmented) == 3  # q_proj, v_proj, down_proj (o_proj has only "y": its base)
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, f"relative error {error:.2e}"


def test_mixed_batch_refusals(tmp_path):
    _, ours = peft_model_with_three_adapters(tmp_path)
    ids = token_ids(batch=2, length=3)
    with torch.no_grad():
        with pytest.raises(ValueError, match="no adapter"):
            with lowrank.mixed_batch(ours, ["x", "nope"]):
                pass
        with pytest.raises(ValueError, match="2 rows"):
            with lowrank.mixed_batch(ours, ["x", "y", "z"]):
                ours(ids)
        lowrank.merge(ours, "x")
        with pytest.raises(ValueError, match="merged"):
            with lowrank.mixed_batch(ours, ["x", "y"]):
                pass
        lowrank.unmerge(ours)
    with pytest.raises(ValueError, match="inference only"):
        with lowrank.mixed_batch(ours, ["x", "y"]):
            ours(ids)


def test_peft_backend_serves_adapter_names(tmp_path, monkeypatch):
    """patch_peft_model's layers run PEFT's adapter_names= on lora_mixed (not PEFT's masks), with
    PEFT's results; with grad enabled PEFT's own forward runs them."""
    import lowrank.mixed

    peft_model, _ = peft_model_with_three_adapters(tmp_path)
    ids = token_ids(batch=4, length=3)
    names = ["z", "y", "__base__", "x"]
    with torch.no_grad():
        expected = peft_model(input_ids=ids, adapter_names=names).logits
    lowrank.patch_peft_model(peft_model)
    served = []
    run_mixed = lowrank.mixed._run_mixed
    monkeypatch.setattr(lowrank.mixed, "_run_mixed", lambda *a: served.append(1) or run_mixed(*a))
    with torch.no_grad():
        actual = peft_model(input_ids=ids, adapter_names=names).logits
    assert len(served) == 4  # q_proj, v_proj, o_proj, down_proj
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, f"relative error {error:.2e}"
    served.clear()
    with_grad = peft_model(input_ids=ids, adapter_names=names).logits
    assert not served
    torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-5, atol=1e-5)
    lowrank.unpatch_peft_model(peft_model)
    assert not any(hasattr(m, lowrank.mixed.MIXED_STACKS) for m in peft_model.modules())


# 3 tokens a row: 9 rows, the decode path; 17: 51 rows, the segmented path.
@pytest.mark.parametrize("length", [3, 17])
def test_mixed_batch_on_a_4bit_model_matches_peft(tmp_path, length):
    """NF4 base layers (bitsandbytes Linear4bit, fp32 compute): the packed weight read in the
    mixed kernels, rows of two adapters of different ranks and a base row."""
    from peft import LoraConfig, get_peft_model

    base = load_tiny_4bit_llama(tmp_path / "a", torch.float32, dtype=torch.float32)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                                 target_modules=["q_proj", "down_proj"]),
                                adapter_name="x")
    peft_model.add_adapter("y", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "saved")
    for name in ("x", "y"):
        lowrank.load_adapter(ours, tmp_path / "saved" / name, adapter_name=name)
    ids = token_ids(batch=3, length=length, vocab_size=128)
    names = ["y", "__base__", "x"]
    assert mixed_kernels.segmented(3 * length, 2) == (length == 17)
    # bitsandbytes' CPU ops as they are (they would torch.compile themselves first: ~10 s).
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        expected = peft_model.eval()(input_ids=ids, adapter_names=names).logits
        with lowrank.mixed_batch(ours.eval(), names):
            actual = ours(ids).logits
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, f"relative error {error:.2e}"

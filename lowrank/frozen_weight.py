"""The frozen weight of an op as one object: dense, or packed NF4 with what decodes it.

``FrozenWeight.of`` builds it from what a caller holds: a dense (N x K) tensor in any strides
(GPT-2's Conv1D weight, transposed, is a view), or packed NF4 bytes with their bitsandbytes
``QuantState`` (a ``Params4bit`` carries its own). It is cheap to build (views and attribute reads,
no copy of the weight), so a layer builds one per call: FSDP2 swaps the weight's tensors between
calls. Ops, their autograd Functions and the kernel launchers take it as it is; a torch.library
custom op cannot take an object, so ``flat`` and ``from_flat`` are the one place that turns it into
the lists a custom op takes and back.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from bitsandbytes.functional import QuantState

from lowrank import _dispatch
from lowrank._quant_state import absmax_fp32, check_quant_state, code_books, read_nf4


@dataclass(frozen=True, eq=False)  # compared by identity: its fields are tensors
class FrozenWeight:
    """A dense weight, or packed NF4 bytes with the tensors and blocksizes that decode them.

    - ``tensor``: what the kernels read: the dense weight, or the packed bytes as flat uint8.
    - ``shape``: the weight's shape, (out_features, in_features) for the linear ops and merges.
    - NF4 only (None / 1 for a dense weight): ``absmax`` (fp32 per block, or uint8 codes when
      nested), ``nested_code`` (the 8-bit code book, fp32), ``nested_absmax`` (fp32), ``offset``
      (0-d fp32) and ``nested_blocksize`` (nested only), ``blocksize``.
    - ``stored`` and ``quant_state``: the weight as the caller holds it, for the reference and for
      an NF4 merge's result, which takes the stored dtype and shape. Inside a custom op, rebuilt by
      ``from_flat``, ``stored`` is ``tensor`` and ``quant_state`` None.
    """

    tensor: torch.Tensor
    shape: tuple
    absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    blocksize: int = 1
    nested_blocksize: int = 1
    stored: Optional[torch.Tensor] = None
    quant_state: Optional[QuantState] = None

    @classmethod
    def of(cls, weight, quant_state=None, op=None):
        """``weight`` itself if it is a FrozenWeight; else a dense weight's, or with a quant state
        (given, or a Params4bit's own) packed NF4's. ``op`` names the op in a type error."""
        if isinstance(weight, FrozenWeight):
            return weight
        if quant_state is None:
            quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            return cls.of_nf4(weight, quant_state)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"lowrank{'.' + op if op else ''}: weight must be a tensor, got "
                            f"{type(weight).__name__}")
        return cls(weight, tuple(weight.shape), stored=weight)

    @classmethod
    def of_nf4(cls, packed, quant_state):
        """Packed NF4 bytes (any shape and storage dtype, read in place) with their QuantState,
        checked; the quant state's tensors in the dtypes the kernels read (as bitsandbytes
        converts them). A weight bitsandbytes repacked for its CPU kernel is read from a copy in
        the standard layout (``read_nf4``): ``stored`` and ``quant_state`` are then the copy's."""
        packed, quant_state = read_nf4(packed, quant_state)
        packed_bytes = check_quant_state(packed, quant_state)
        shape = tuple(quant_state.shape)
        if not quant_state.nested:
            return cls(packed_bytes, shape, absmax_fp32(quant_state),
                       blocksize=quant_state.blocksize, stored=packed, quant_state=quant_state)
        state2 = quant_state.state2
        return cls(packed_bytes, shape, quant_state.absmax, state2.code.float(),
                   state2.absmax.float(), quant_state.offset.float().reshape(()),
                   quant_state.blocksize, state2.blocksize, stored=packed, quant_state=quant_state)

    def flat(self):
        """(tensors, ints): this weight as a torch.library custom op takes it, the argument types
        ``list[Optional[Tensor]]`` and ``list[int]``. ``from_flat`` reads them back."""
        return ([self.tensor, self.absmax, self.nested_code, self.nested_absmax, self.offset],
                [self.blocksize, self.nested_blocksize, *self.shape])

    @classmethod
    def from_flat(cls, tensors, ints):
        tensor, absmax, nested_code, nested_absmax, offset = tensors
        blocksize, nested_blocksize, *shape = ints
        return cls(tensor, tuple(shape), absmax, nested_code, nested_absmax, offset, blocksize,
                   nested_blocksize, stored=tensor)

    def use_kernels(self, **tensors):
        """``lowrank._dispatch.use_kernels`` for ``tensors`` (by name) and this weight's."""
        return _dispatch.use_kernels(weight=self.stored, **tensors, absmax=self.absmax,
                                     nested_absmax=self.nested_absmax)

    @property
    def out_features(self):
        return self.shape[0]

    @property
    def in_features(self):
        return self.shape[-1]

    @property
    def nf4(self):
        """What the kernel launchers take to decode the packed bytes (this object, read by name in
        ``kernels/_weight.weight_args``), or None for a dense weight."""
        return None if self.absmax is None else self

    @property
    def code(self):
        """The 16 NF4 values (fp32) on the weight's device, for the kernels."""
        return code_books(self.tensor.device)[0]

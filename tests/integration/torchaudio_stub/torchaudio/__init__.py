"""A stand-in for torchaudio in the LLaMA-Factory test venv. LLaMA-Factory imports torchaudio at
module level (for audio datasets, which these tests do not use); the torchaudio wheel pip resolves
next to a CPU build of torch is a CUDA build that fails to import there."""


def load(*args, **kwargs):
    raise RuntimeError("torchaudio is a stand-in in this venv (tests/integration/torchaudio_stub)")


class functional:  # noqa: N801 (torchaudio.functional is a module upstream)
    resample = load

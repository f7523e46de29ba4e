"""The backend contract of ``patch_peft_model``: a patched PEFT layer runs lowrank's op only where
the op accepts the call, and PEFT's own forward otherwise, counted and warned about once.

``checked`` reads a call's operands and runs the op's own argument checks (the functions
``lowrank.ops`` raise from) and turns what they would raise into a reason, so no precondition of
an op can surface as an exception from a patched PEFT layer. ``fall_back`` runs PEFT's forward
for that call, counts the reason (read with ``lowrank.stats()``) and warns the first time each
reason is seen.
"""

import collections
import warnings

# {reason: calls of patched PEFT layers that ran PEFT's forward for it}, since import or the last
# ``reset_stats``.
_FALLBACKS = collections.Counter()
_WARNED = set()


def checked(prepare, *args, **kwargs):
    """(``prepare(*args, **kwargs)``, None), or (None, why) where it raises what lowrank's checks
    raise on operands they refuse (TypeError, ValueError, NotImplementedError: the op's argument
    checks, the frozen weight's, the device's)."""
    try:
        return prepare(*args, **kwargs), None
    except (TypeError, ValueError, NotImplementedError) as error:
        return None, str(error)


def fall_back(layer, reason, x, args, kwargs):
    """PEFT's own forward of ``layer`` for this call, which lowrank cannot run for ``reason`` (None:
    PEFT runs the base layer alone, which lowrank would not speed up; not counted)."""
    if reason is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    _FALLBACKS[reason] += 1
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"lowrank.patch_peft_model: a {type(layer).__name__} layer runs PEFT's own "
                      f"forward (not accelerated): {reason}. Counted in lowrank.stats(); this "
                      "warning is given once per reason", stacklevel=3)
    return type(layer).forward(layer, x, *args, **kwargs)


def stats():
    """{"peft_fallbacks": {reason: calls}}: the calls of layers patched by ``patch_peft_model``
    that ran PEFT's own forward because lowrank could not run them, by reason."""
    return {"peft_fallbacks": dict(_FALLBACKS)}


def reset_stats():
    """Zero the counts of ``stats``; each reason is warned about again the next time it is seen."""
    _FALLBACKS.clear()
    _WARNED.clear()

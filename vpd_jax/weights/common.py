"""Shared pieces of the weight readers: finding a source, reading tensors safely, checking a param tree.

Sources are local files, local folders or Hugging Face hub ids. Tensors come back as numpy arrays keyed by
their original names. ``.safetensors`` and ``.msgpack`` need no torch; ``.ckpt``/``.bin``/``.pth`` are read
with ``torch.load(weights_only=True)`` so no pickled code is ever executed. Heavy packages are imported inside
the functions that need them, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vpd_jax.errors import WeightsError  # noqa: F401 (raised here, imported from here by other modules)


def _late_callback_on_closed_loop(u) -> bool:
    """An asyncio loop's ``call_soon_threadsafe`` refused after the loop closed: tensorstore completing the reads
    of a failed orbax call (a damaged checkpoint) after orbax has closed the loop that waited for them."""
    if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
        return False
    tb = u.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


_QUIETED = False


def _orphaned_tensorstore_read(record: logging.LogRecord) -> bool:
    """asyncio's "Task exception was never retrieved" for a tensorstore read that orbax abandoned when another
    read of the same call failed first (the rest of a damaged checkpoint's errors)."""
    exc = record.exc_info[1] if record.exc_info else None
    return str(record.msg).startswith("Task exception was never retrieved") and "tensorstore_spec" in str(exc)


def orbax():
    """``orbax.checkpoint``, imported on first use. A failed read (a damaged checkpoint) leaves tensorstore reads
    behind: their callbacks land on orbax's closed event loop (an unraisable traceback each) or their tasks are
    collected with an unretrieved error (a logged traceback each), hundreds of lines after the read's own
    one-line error. Those, and only those, are dropped."""
    import orbax.checkpoint as ocp

    global _QUIETED
    if not _QUIETED:
        _QUIETED = True
        logging.getLogger("asyncio").addFilter(lambda r: not _orphaned_tensorstore_read(r))
        previous = sys.unraisablehook

        def drop_closed_loop_callbacks(u):
            if not _late_callback_on_closed_loop(u):
                previous(u)

        sys.unraisablehook = drop_closed_loop_callbacks
    return ocp

TORCH_SUFFIXES = (".ckpt", ".bin", ".pth", ".pt")


# ----------------------------------------------------------------------------------------------- sources

def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` with no local path of that name: treated as a Hugging Face hub repository id."""
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        return False
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not any(p.startswith(".") for p in parts)


def hub_download(repo_id: str, filenames: Sequence[str], subfolder: str | None = None) -> pathlib.Path:
    """Fetch the first of ``filenames`` that ``repo_id`` has (in ``subfolder``) through huggingface_hub.

    Returns the local path of that file. Offline with nothing cached, this raises one ``WeightsError``
    saying so, rather than a stack of network errors.
    """
    try:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is in requirements.txt
        raise WeightsError(f"{repo_id}: reading a hub id needs huggingface_hub ({e})") from e
    errors = []
    for name in filenames:
        try:
            return pathlib.Path(huggingface_hub.hf_hub_download(repo_id, name, subfolder=subfolder))
        except LocalEntryNotFoundError as e:  # offline (or no network) and not cached
            raise WeightsError(
                f"{repo_id}: cannot fetch {(subfolder + '/') if subfolder else ''}{name} from the Hugging Face hub: "
                f"offline or unreachable, and not in the local cache; pass a local folder or file instead, or run "
                f"once with network access ({type(e).__name__})"
            ) from None
        except EntryNotFoundError as e:
            errors.append(f"{name}: not in the repository ({type(e).__name__})")
        except Exception as e:  # noqa: BLE001 - offline/auth/network errors all become one message
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsError(
                f"{repo_id}: could not fetch {(subfolder + '/') if subfolder else ''}{name} from the Hugging "
                f"Face hub and it is not in the local cache ({type(e).__name__}: {msg}); pass a local folder "
                f"or file instead, or run once with network access"
            ) from e
    raise WeightsError(f"{repo_id}: none of {list(filenames)} found on the hub ({'; '.join(errors)})")


def find_in_folder(folder: pathlib.Path, filenames: Sequence[str], subfolders: Sequence[str | None]) -> pathlib.Path:
    """The first existing ``folder/sub/name`` over ``subfolders`` x ``filenames`` (in that priority)."""
    for sub in subfolders:
        base = folder / sub if sub else folder
        for name in filenames:
            if (base / name).is_file():
                return base / name
    looked = sorted({str(folder / s) if s else str(folder) for s in subfolders})
    raise WeightsError(f"{folder}: no weight file found; looked for {list(filenames)} in {looked}")


# ---------------------------------------------------------------------------------------------- reading

def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as float32/int numpy arrays (bf16/fp16 are upcast)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a valid safetensors file ({e})") from None
    except Exception as e:  # noqa: BLE001 - numpy backend cannot hold bf16; fall back to torch
        if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
            raise WeightsError(f"{path}: could not read safetensors file ({e})") from e
        from safetensors.torch import load_file as load_torch

        return {k: _torch_to_numpy(v) for k, v in load_torch(str(path)).items()}
    return {k: _upcast(v) for k, v in tensors.items()}


def read_torch(path: str | os.PathLike) -> dict[str, Any]:
    """A PyTorch pickle (``.ckpt``/``.bin``/``.pth``) read with ``weights_only=True``: no code is executed.

    Returns the loaded object with every tensor turned into a numpy array (nested dicts are kept).
    """
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"{path}: reading a PyTorch file needs torch (pip install torch) ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "WeightsUnpickler" in str(e):
            raise WeightsError(
                f"{path}: refused to unpickle: the file needs arbitrary code to load (torch.load "
                f"weights_only=True rejected it: {first})"
            ) from e
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from e
    return _tree_to_numpy(obj)


def read_msgpack(path: str | os.PathLike) -> dict[str, Any]:
    """A Flax ``msgpack`` param file (as written by ``flax.serialization.to_bytes``) as a nested dict."""
    from flax import serialization

    data = pathlib.Path(path).read_bytes()
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: not a valid Flax msgpack file ({type(e).__name__}: {e})") from e
    if not isinstance(tree, Mapping):
        raise WeightsError(f"{path}: expected a dict of parameters, found {type(tree).__name__}")
    return _tree_to_numpy(tree)


def read_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """Read a weight file by its suffix: safetensors, PyTorch pickle (weights only) or Flax msgpack."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        return read_safetensors(p)
    if p.suffix in TORCH_SUFFIXES:
        return read_torch(p)
    if p.suffix == ".msgpack":
        return read_msgpack(p)
    raise WeightsError(f"{p}: unknown weight file type {p.suffix!r}; expected .safetensors, .msgpack, "
                       f"{', '.join(TORCH_SUFFIXES)}")


def _upcast(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype in (np.float16,) or a.dtype.name == "bfloat16" else a


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


def _tree_to_numpy(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _tree_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_to_numpy(v) for v in obj)
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        return _torch_to_numpy(obj)
    if isinstance(obj, np.ndarray):
        return _upcast(obj)
    return obj


# ---------------------------------------------------------------------------------------- tree helpers

def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """``{'a': {'b': x}}`` -> ``{'a/b': x}``."""
    out: dict[str, Any] = {}

    def rec(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(f"{prefix}{sep}{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    rec("", tree)
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """``{'a/b': x}`` -> ``{'a': {'b': x}}``."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def check_tree(expected: Mapping[str, Any], got: Mapping[str, Any], what: str, *, limit: int = 12) -> None:
    """Raise one ``WeightsError`` listing missing keys, unexpected keys and shape mismatches by name.

    ``expected`` holds arrays or ``jax.ShapeDtypeStruct`` leaves (from ``jax.eval_shape`` of the init).
    """
    exp, have = flatten(expected), flatten(got)
    missing = sorted(set(exp) - set(have))
    unexpected = sorted(set(have) - set(exp))
    mismatched = [
        f"{k}: file {tuple(np.shape(have[k]))} vs model {tuple(exp[k].shape)}"
        for k in sorted(set(exp) & set(have))
        if tuple(np.shape(have[k])) != tuple(exp[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    raise WeightsError(f"{what}: weights do not fit the model; " + "; ".join(parts))


def strip_prefix(state: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    """Keep the keys under the first of ``prefixes`` that any key has, with that prefix removed."""
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return {}


# ---------------------------------------------------------------------- PyTorch -> Flax tensor layouts

def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (O, I, kh, kw) -> Flax kernel (kh, kw, I, O)."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (O, I) -> Flax Dense kernel (I, O); a 1x1 conv weight (O, I, 1, 1) too."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.ascontiguousarray(w.T)


def torch_module_to_flax(state: Mapping[str, np.ndarray], *, conv_as_dense: Iterable[str] = (),
                         consume: bool = False) -> dict:
    """Convert a diffusers-style PyTorch state dict to a nested Flax param dict, names and layouts.

    ``a.0.b.weight`` becomes ``a_0/b/{kernel|scale}``: 4-D weights are conv kernels (HWIO), 2-D weights are
    dense kernels (transposed), 1-D weights are norm scales; ``bias`` keeps its name. Module paths whose
    dotted name ends with an entry of ``conv_as_dense`` take 4-D 1x1 weights as dense kernels.
    Non-parameter buffers (``num_batches_tracked``, ``running_*``, ``position_ids``) must be removed first.
    ``consume=True`` pops each entry from ``state`` (a dict) as it is converted, releasing the source tensors
    early so that converting a large model needs little more than one copy of it.
    """
    dense_suffixes = tuple(conv_as_dense)
    flat: dict[str, np.ndarray] = {}
    for key in list(state):
        value = state.pop(key) if consume else state[key]  # type: ignore[attr-defined]
        *mod, leaf = key.split(".")
        module = ".".join(mod)
        path = flax_path(mod)
        v = np.asarray(value)
        if leaf == "bias":
            flat[path + "/bias"] = v
        elif leaf == "weight":
            if v.ndim == 4 and not module.endswith(dense_suffixes):
                flat[path + "/kernel"] = conv_kernel(v)
            elif v.ndim in (2, 4):
                flat[path + "/kernel"] = dense_kernel(v)
            elif v.ndim == 1:
                flat[path + "/scale"] = v
            else:
                raise WeightsError(f"{key}: cannot convert a {v.ndim}-D weight")
        else:
            flat[path + "/" + leaf] = v
    return unflatten(flat)


def flax_path(parts: Sequence[str]) -> str:
    """``['down_blocks', '0', 'resnets', '1', 'conv1']`` -> ``down_blocks_0/resnets_1/conv1``."""
    out: list[str] = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return "/".join(out)


CLASS_TABLE_KEY = "class_embeddings"  # the tensor's name in a .safetensors class table


def load_class_table(path: str | os.PathLike) -> np.ndarray:
    """A class-embedding table: ``.npy``, ``.safetensors`` (tensor ``class_embeddings``, else the first), or a
    PyTorch file holding a bare tensor like the official ``nyu_class_embeddings.pth`` (read weights only)."""
    path = pathlib.Path(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        return tensors[CLASS_TABLE_KEY] if CLASS_TABLE_KEY in tensors else next(iter(tensors.values()))
    obj = read_torch(path)
    if isinstance(obj, dict):  # tolerate {'class_embeddings': tensor}-style files
        obj = obj.get(CLASS_TABLE_KEY, next(iter(obj.values())))
    return np.asarray(obj)

"""Run ``residual_rewriter.convert_`` over one model of every timm model family, built tiny.

Families: timm's model modules (``timm.models._registry._model_to_module``: ``vision_transformer``,
``resnet``, ``swin_transformer``, ... 98 in timm 1.0.31), each represented by ONE registered name
(entrypoint). Of a family's names (``timm.list_models()`` order) the sweep takes, unless PREFERRED names
one, the first with the smallest size word: timm's own ``test_*`` models first, then atto, femto, pico,
nano, tiny, xxs, xs, mini, small, lite, s, t (as a whole ``_``-token, or a token such as ``s18``/``t8``);
a family with none of them gets its first name. PREFERRED picks a small member where that rule finds
only large ones (all of these are shrunk further below anyway, where the family takes size arguments).

Each model is built TINY, nothing downloaded: ``timm.create_model(name, pretrained=False, num_classes=0,
drop_path_rate=0.2, **overrides)`` (pooled features out; DropPath drawn in training). The overrides come
from the arguments the model class actually receives (recorded on the meta device: the entrypoint's own
``model_args`` included; a dataclass config's fields too), by general rules (``tiny_overrides``): depth 2;
per-stage depths (``depths``/``layers``/``block_config``) at most 2 (4 sublayers a stage); heads 2 (per
stage ``min(heads, 2**i)``); width 32 (per stage ``16 * 2**i``); ``img_size`` 64 where larger (a multiple
of the patch size: 70 for 14-pixel patches). Where the entrypoint fixes an overridden argument itself
(``dict(depths=..., **kwargs)``: "got multiple values"), the class is built directly with the
entrypoint's other arguments (the row's ``built_by``: "class"). Where the model rejects the overrides (at
build or on its input) the sweep falls back: depths and image size only, then image size only, then the
default size (each also without ``drop_path_rate`` where the class takes none). The default size is
skipped, "build failed: too large", over MAX_PARAMS (30M) parameters (counted on the meta device).

The model is seeded (``torch.manual_seed(0)``), float64 (``model.double()``), eval mode, and its input
is ``torch.randn(2, 3, S, S, dtype=float64)`` (seeded): S the ``img_size`` set, else 64 where the model
runs on it (conv nets take any size; a third of the default's side keeps float64 on one core fast),
else ``pretrained_cfg['input_size']``.

    OMP_NUM_THREADS=1 python benchmarks/convert/sweep_timm.py         # all families (~3 min on 1 core)
    python benchmarks/convert/sweep_timm.py --only 'vit|swin' --limit 5 --timeout 30 --out /tmp/s.json
    python benchmarks/convert/sweep_timm.py --names resnet18 convnext_atto   # these names, not families
    python benchmarks/convert/sweep_timm.py --per-family 0    # every timm model (1,371; about an hour)

Outcomes (as ``sweep_hf.py``):
    exact              converted (``convert_(copy, example_inputs=x, num_blocks=2)`` on a deep copy of the
                       eval model) and its output equals the original's (rel err by norm <= 1e-9, eval, no
                       grad); then in training mode with the same random draws (dropout, DropPath), the
                       output and the gradient of every parameter of a loss on it equal the original's too
                       (output <= 1e-9, gradients <= 1e-8 relative to each parameter's gradient, with a floor
                       at the whole model's gradient scale for near-zero ones: ``sweep_common.training_check``)
    oracle mismatch    exact, but not with non-zero queries: against the independent oracle, or the training
                       graphs against eval's (``sweep_common.oracle_check``): a bug
    mismatch           converted, but the eval outputs differ: a bug
    train mismatch     exact in eval, not in training, or a parameter without its gradient: a bug
    refused            ``ConversionError``: its first line shown, the full reason in the JSON
    crash              any other exception from ``convert_`` or the converted model: a bug; the row shows
                       the innermost residual_rewriter frame, the JSON also the traceback
    timeout            the model took more than --timeout seconds (default 120), build included
    build failed       the tiny model cannot be built or run at any fallback, or is too large

The conversion, the checks and the output are shared with ``sweep_hf.py`` (``sweep_common.py``).
Prints one row per model as it finishes, then the count per outcome, and writes
benchmarks/results/timm-sweep-timm<version>-<date>.json (``-partial`` with --only/--limit/--names).
Exits 1 when a row is a crash, a mismatch, a train mismatch or an oracle mismatch. Set ``OMP_NUM_THREADS=1`` beside other
jobs (the script sets it when unset, before torch is imported).
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import inspect
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import timm  # noqa: E402
import timm.models._registry as timm_registry  # noqa: E402

import residual_rewriter as rr  # noqa: E402
from residual_rewriter.passes.errors import first_line  # noqa: E402
from sweep_common import check_converted, run_with_timeout, sweep, write_results  # noqa: E402  (beside this file)

MAX_PARAMS = 30_000_000
INPUT_SIDE = 64
BASE = {"pretrained": False, "num_classes": 0, "drop_path_rate": 0.2}
SIZE_WORDS = ["test", "atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small", "lite", "s", "t"]
# where the size-word rule finds only large members of a family: a small one (all timm 1.0.31 names)
PREFERRED = {
    "fastvit": "fastvit_t8", "senet": "legacy_seresnet18", "tresnet": "tresnet_m", "regnet": "regnetx_002",
    "vovnet": "ese_vovnet19b_dw", "resnetv2": "resnetv2_18",
    "swin_transformer": "swin_tiny_patch4_window7_224",  # the plain Swin, not the rule's swin_s3 (AutoFormerV2)
}
DEPTH_INT = ("depth", "num_blocks")
DEPTH_LISTS = ("depths", "layers", "block_config")
WIDTH_LISTS = ("embed_dims", "dims", "widths")


class _Recorded(BaseException):
    pass


def _size_rank(name: str) -> int:
    ranks = [len(SIZE_WORDS)]
    for tok in re.split(r"[_.]", name):
        m = re.fullmatch(r"\d*([a-z]+)\d*", tok)
        if m and m.group(1) in SIZE_WORDS:
            ranks.append(SIZE_WORDS.index(m.group(1)))
    return min(ranks)


def families(per_family: int = 1) -> list[tuple[str, str]]:
    """[(family = timm model module, a model name)], ``per_family`` names per family (0: all), sorted by
    family: the pick (PREFERRED, else the smallest size word, list order on ties), then the others by size
    word and list order."""
    names = collections.defaultdict(list)
    for name in timm.list_models():
        names[timm_registry._model_to_module.get(name, "?")].append(name)
    out = []
    for fam, ns in sorted(names.items()):
        ranked = sorted(ns, key=_size_rank)  # stable: list order on ties
        if PREFERRED.get(fam) in ns:
            ranked.remove(PREFERRED[fam])
            ranked.insert(0, PREFERRED[fam])
        out += [(fam, n) for n in ranked[: per_family or None]]
    return out


def class_args(name: str, kwargs: dict) -> tuple[type, dict, int, tuple]:
    """(model class, every argument its __init__ receives from ``create_model(name, **kwargs)`` with
    defaults applied, its parameter count, its ``pretrained_cfg['input_size']``): two builds on the meta
    device, nothing allocated."""
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    cls, numel = type(model), sum(p.numel() for p in model.parameters())
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    init, seen = cls.__init__, {}

    def recorder(self, *args, **kw):
        bound = inspect.signature(init).bind(self, *args, **kw)
        bound.apply_defaults()
        seen.update(list(bound.arguments.items())[1:])
        raise _Recorded()

    cls.__init__ = recorder
    try:
        with torch.device("meta"):
            timm.create_model(name, **kwargs)
    except _Recorded:
        pass
    finally:
        cls.__init__ = init
    params = inspect.signature(init).parameters
    var = [k for k in seen if params[k].kind == inspect.Parameter.VAR_KEYWORD]
    args = {k: v for k, v in seen.items() if k not in var}
    for k in var:  # **kwargs: passed on as they came
        args.update(seen[k])
    return cls, args, numel, size


def instantiate(name: str, kwargs: dict, recorded: tuple[type, dict]) -> tuple[torch.nn.Module, str]:
    """(``create_model(name, **kwargs)``, "create_model"); where the entrypoint fixes an argument that
    ``kwargs`` overrides (``dict(depths=(3, 3, 9, 3), **kwargs)``: "got multiple values"), the class is
    built directly with the entrypoint's other arguments: (``cls(**{**recorded args, **kwargs})``, "class")."""
    try:
        return timm.create_model(name, **kwargs), "create_model"
    except TypeError as exc:
        if "multiple values for keyword argument" not in str(exc):
            raise
    cls, args = recorded
    return cls(**{**args, **{k: v for k, v in kwargs.items() if k != "pretrained"}}), "class"


def _view(args: dict) -> dict:
    """The class's arguments with a dataclass config's fields beside them (NaFlexVit's ``cfg``: its
    ``**kwargs`` override those fields)."""
    out = dict(args)
    for v in args.values():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update({f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.name not in out})
    return out


def _ints(v) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(type(x) is int for x in v)


def _side(img_size) -> int | None:
    if type(img_size) is int:
        return img_size
    if _ints(img_size) and len(set(img_size)) == 1:
        return img_size[0]
    return None


def tiny_overrides(args: dict) -> list[dict]:
    """Fallback levels of size overrides from the class's arguments: [all, depths + image size, image
    size]. Rules (on ``_view(args)``): int depth -> 2; per-stage depth lists -> at most 2 each; heads -> 2
    (per stage min(h, 2**i));
    ``embed_dim`` -> 32 (a per-stage list -> 16 * 2**i, as ``embed_dims``/``dims``/``widths``), a width
    never growing; ``img_size`` -> 64 where larger (a multiple of an int ``patch_size``)."""
    args = _view(args)
    image, depth, width = {}, {}, {}
    side, patch = _side(args.get("img_size")), args.get("patch_size")
    if side and side > INPUT_SIDE:  # a multiple of the patch size (a 14-pixel patch: 70)
        image["img_size"] = -(-INPUT_SIDE // patch) * patch if type(patch) is int and patch > 0 else INPUT_SIDE
    for key in DEPTH_INT:
        if type(args.get(key)) is int and args[key] > 2:
            depth[key] = 2
    for key in DEPTH_LISTS:
        if _ints(args.get(key)) and max(args[key]) > 2:
            depth[key] = type(args[key])(min(d, 2) for d in args[key])
    heads = args.get("num_heads")
    if type(heads) is int and heads > 2:
        width["num_heads"] = 2
    elif _ints(heads):
        width["num_heads"] = type(heads)(min(h, 2**i) for i, h in enumerate(heads))
    for key in ("embed_dim",) + WIDTH_LISTS:
        v = args.get(key)
        if type(v) is int and v > 32:
            width[key] = 32
        elif _ints(v):
            width[key] = type(v)(min(w, 16 * 2**i) for i, w in enumerate(v))
    levels = [{**image, **depth, **width}, {**image, **depth}, image]
    return [lvl for i, lvl in enumerate(levels) if lvl not in levels[:i]]


def _input(side: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, side, side, generator=g, dtype=torch.float64)


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """(the tiny float64 model in eval mode, its input, what was built: overrides, params, input size).
    Raises with the last failure when no fallback level builds and runs."""
    base = BASE
    try:
        cls, args, _, size = class_args(name, base)
    except TypeError as exc:  # the class takes no drop_path_rate
        if "drop_path_rate" not in str(exc):
            raise
        base = {k: v for k, v in BASE.items() if k != "drop_path_rate"}
        cls, args, _, size = class_args(name, base)
    default_side = _side(size[1:])
    last = None
    for overrides in tiny_overrides(args) + [{}]:
        for kw in (base, {k: v for k, v in base.items() if k != "drop_path_rate"}):
            if kw is not base and "drop_path_rate" not in str(last):
                break  # failed for another reason than drop_path_rate: the next level
            kwargs = {**kw, **overrides}
            try:
                with torch.device("meta"):
                    meta, _ = instantiate(name, kwargs, (cls, args))
                numel = sum(p.numel() for p in meta.parameters())
            except Exception as exc:  # noqa: BLE001 - rejected: the next level
                last = exc
                continue
            if numel > MAX_PARAMS:
                last = RuntimeError(f"too large: {numel / 1e6:.1f}M parameters with {overrides or 'the default size'}")
                break
            torch.manual_seed(0)
            try:
                model, how = instantiate(name, kwargs, (cls, args))
                model = model.double().eval()
            except Exception as exc:  # noqa: BLE001
                last = exc
                continue
            if "img_size" in overrides:
                sides = [_side(overrides["img_size"])]
            else:  # 64 where the model runs on it, else its own size
                sides = [s for s in (INPUT_SIDE if default_side is None or default_side > INPUT_SIDE else None,
                                     default_side or 224) if s]
            for side in dict.fromkeys(sides):
                x = _input(side)
                try:
                    with torch.no_grad():
                        model(x)
                except Exception as exc:  # noqa: BLE001 - not at this size / level
                    last = exc
                    continue
                info = {"kwargs": {k: v for k, v in kwargs.items() if k not in ("pretrained", "num_classes")},
                        "built_by": how, "params": numel, "input": list(x.shape)}
                return model, x, info
            break  # built, but runs on no input: the next level (drop_path_rate is not the cause)
    raise last if last is not None else RuntimeError("nothing to build")


def sweep_one(family: str, name: str) -> dict:
    row = {"model": name, "family": family, "outcome": None, "rel_err": None, "reason": ""}
    try:
        original, x, info = build(name)
        row.update(info)
        model = copy.deepcopy(original)  # taken in eval mode
    except Exception as exc:  # noqa: BLE001
        return {**row, "outcome": "build failed", "reason": first_line(exc)}
    return check_converted(row, original, model, lambda m, **o: rr.convert_(m, example_inputs=x, **{"num_blocks": 2, **o}),
                           {"x": x})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="only families or model names matching this (a regular expression, case-insensitive)")
    p.add_argument("--limit", type=int, help="at most this many models (after --only)")
    p.add_argument("--timeout", type=int, default=120, help="seconds per model, build included (default 120)")
    p.add_argument("--per-family", type=int, default=1, help="models per family (default 1; 0: every model)")
    p.add_argument("--names", nargs="+", help="these timm model names instead of one per family")
    p.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/timm-sweep-...json)")
    args = p.parse_args(argv)
    logging.getLogger("torch").setLevel(logging.ERROR)
    logging.getLogger("timm").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    if args.names:
        todo = [(timm_registry._model_to_module.get(n, "?"), n) for n in args.names]
    else:
        todo = families(args.per_family)
    todo = [t for t in todo if not args.only or any(re.search(args.only, s, re.IGNORECASE) for s in t)]
    t0 = time.perf_counter()
    rows = sweep(todo[: args.limit], lambda family, name: run_with_timeout(
        args.timeout, {"model": name, "family": family}, sweep_one, family, name),
        {"model": 36, "family": 24, "outcome": 15}, 170)
    wall = round(time.perf_counter() - t0, 1)
    partial = "-partial" if args.only or args.limit or args.names else ""
    partial += f"-{args.per_family or 'all'}-per-family" if args.per_family != 1 and not args.names else ""
    name = f"timm-sweep-timm{timm.__version__}-{{date}}{partial}"
    return write_results(rows, args.out, name, f"models in {wall:.0f} s", timm,
                         omp_num_threads=os.environ.get("OMP_NUM_THREADS"), only=args.only, limit=args.limit,
                         names=args.names, per_family=args.per_family, timeout_s=args.timeout, wall_s=wall)


if __name__ == "__main__":
    sys.exit(main())

"""Every input a user can give is refused cleanly: one ``error: ...`` line naming the value and the fix, exit
code 2, never a traceback and never a silent success (docs: README "Command line").

``CASES`` is the table for the command line: (argv, expected exit code, words the message must contain).
A new command gets the same coverage by adding rows.  ``{...}`` in argv names a path of the ``paths``
fixture: the tiny models (``text`` in our layout, ``diffusers`` in diffusers'), damaged copies of them
(``{v[NAME]}``, built on first use by ``VARIANTS[NAME]``), a regular file ``afile``, a read-only folder
``ro`` and so on.  ``API_CASES`` is the same table for the Python API (exception type and words).  The
training runs' own failures (a second run on the same ``--out``, SIGKILL during a checkpoint write, a full
disk during a save) are tests of their own at the end.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support import authors
from support.data import make_caption_folder, make_token_dir
from support.weights import tiny_text_components

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.cli import main
from vqdiffusion.config import ConfigError
from vqdiffusion.convert.authors import convert_authors_checkpoint
from vqdiffusion.data.shapes import make_dataset
from vqdiffusion.devices import DeviceError
from vqdiffusion.eval.fid import ReferenceStats, ReferenceStatsError
from vqdiffusion.formats.components import PipelineComponents
from vqdiffusion.formats.diffusers import save_diffusers
from vqdiffusion.formats.keymap import ConversionError
from vqdiffusion.formats.ours import save_ours
from vqdiffusion.io import OutputExistsError, OutputPathError, atomic_write_bytes, check_output_path
from vqdiffusion.models.denoiser import Denoiser, DenoiserConfig
from vqdiffusion.sampling import SamplingOptions
from vqdiffusion.training.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint
from vqdiffusion.training.denoiser_config import DenoiserTrainConfig
from vqdiffusion.training.export import export_pipeline
from vqdiffusion.training.output_dir import OutputDirInUseError, claim_output_dir

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_DEV_FULL = os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)
NO_CUDA = not torch.cuda.is_available()
DEEP = 5000  # JSON nesting far beyond Python's recursion limit


# ---------------------------------------------------------------------------------------------------------
# Tiny models and their damaged copies
# ---------------------------------------------------------------------------------------------------------
def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def _nan_in_first_matrix(state: dict[str, torch.Tensor]) -> None:
    key = next(k for k, v in sorted(state.items()) if v.ndim == 2)
    state[key][0, 0] = float("nan")


def _times_1e30(state: dict[str, torch.Tensor]) -> None:
    """Finite but absurd weights: every floating tensor x 1e30 (still below float32's 3.4e38)."""
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = value * 1e30


def _as_int(state: dict[str, torch.Tensor]) -> None:
    for key in state:
        state[key] = (state[key] * 100).to(torch.int32)


def _deep(path: Path, opener: str = "[", closer: str = "]") -> None:
    path.write_text(opener * DEEP + closer * DEEP)


def _v1_class_index(root: Path) -> None:
    index = {"format": "vqdiffusion-pipeline", "format_version": 1, "condition": "class"}
    (root / "vqdiffusion.json").write_text(json.dumps({**index, "null_condition": "learned", "null_class_label": 4}))


# name -> (the model folder it starts from, the edit)
VARIANTS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "deep_config": ("text", lambda m: _deep(m / "denoiser" / "config.json")),
    "deep_index": ("text", lambda m: (m / "vqdiffusion.json").write_text('{"a":' * DEEP + "1" + "}" * DEEP)),
    "deep_vqvae_config": ("text", lambda m: _deep(m / "vqvae" / "config.json", '{"a":', "}")),
    "deep_diffusers_index": ("diffusers", lambda m: _deep(m / "model_index.json")),
    "huge_T": (
        "text",
        lambda m: (
            _edit_json(m / "denoiser" / "config.json", num_timesteps=10**9),
            _edit_json(m / "schedule.json", num_timesteps=10**9),
        ),
    ),
    "huge_T_schedule": ("text", lambda m: _edit_json(m / "schedule.json", num_timesteps=10**9)),
    "huge_width": ("text", lambda m: _edit_json(m / "denoiser" / "config.json", dim=10**6)),
    "huge_layers": ("text", lambda m: _edit_json(m / "denoiser" / "config.json", num_layers=10**9)),
    "huge_codebook": ("text", lambda m: _edit_json(m / "vqvae" / "config.json", num_embeddings=10**10)),
    "huge_vq_blocks": ("text", lambda m: _edit_json(m / "vqvae" / "config.json", layers_per_block=10**9)),
    "huge_diffusers_T": (
        "diffusers",
        lambda m: (
            _edit_json(m / "transformer" / "config.json", num_embeds_ada_norm=10**9),
            _edit_json(m / "scheduler" / "scheduler_config.json", num_train_timesteps=10**9),
        ),
    ),
    "huge_diffusers_width": (
        "diffusers",
        lambda m: _edit_json(m / "transformer" / "config.json", attention_head_dim=10**6),
    ),
    "huge_dim": ("text", lambda m: _edit_json(m / "denoiser" / "config.json", dim=10**20)),
    "mlp_ratio_digits": ("text", lambda m: _edit_json(m / "denoiser" / "config.json", mlp_ratio=10**400)),
    "mlp_ratio_1e308": ("text", lambda m: _edit_json(m / "denoiser" / "config.json", mlp_ratio=1e308)),
    "norm_eps_inf": ("text", lambda m: _edit_json(m / "denoiser" / "config.json", norm_eps=float("inf"))),
    "norm_eps_1e300": ("text", lambda m: _edit_json(m / "denoiser" / "config.json", norm_eps=1e300)),
    "vqvae_norm_eps_inf": ("text", lambda m: _edit_json(m / "vqvae" / "config.json", norm_eps=float("inf"))),
    "vqvae_norm_eps_1e300": ("text", lambda m: _edit_json(m / "vqvae" / "config.json", norm_eps=1e300)),
    "nan_weights": ("text", lambda m: _edit_weights(m / "denoiser" / "model.safetensors", _nan_in_first_matrix)),
    "nan_vqvae": ("text", lambda m: _edit_weights(m / "vqvae" / "model.safetensors", _nan_in_first_matrix)),
    "nan_null": ("text", lambda m: _edit_weights(m / "null_condition.safetensors", _nan_in_first_matrix)),
    "nan_diffusers": (
        "diffusers",
        lambda m: _edit_weights(m / "transformer" / "diffusion_pytorch_model.safetensors", _nan_in_first_matrix),
    ),
    "huge_denoiser": ("text", lambda m: _edit_weights(m / "denoiser" / "model.safetensors", _times_1e30)),
    "huge_null": ("text", lambda m: _edit_weights(m / "null_condition.safetensors", _times_1e30)),
    "huge_vqvae": ("text", lambda m: _edit_weights(m / "vqvae" / "model.safetensors", _times_1e30)),
    "int_weights": ("text", lambda m: _edit_weights(m / "denoiser" / "model.safetensors", _as_int)),
    "int_null": ("text", lambda m: _edit_weights(m / "null_condition.safetensors", _as_int)),
    "defaults_nan": ("text", lambda m: (m / "defaults.json").write_text('{"guidance_scale": NaN}')),
    "defaults_steps": ("text", lambda m: _edit_json(m / "defaults.json", num_inference_steps=1000)),
    "defaults_sampler": ("text", lambda m: _edit_json(m / "defaults.json", sampler="greedy")),
    "defaults_guidance": ("text", lambda m: _edit_json(m / "defaults.json", guidance_scale=1e30)),
    "defaults_temperature": ("text", lambda m: _edit_json(m / "defaults.json", temperature=1e-300)),
    "index_null": ("text", lambda m: _edit_json(m / "vqdiffusion.json", condition={"kind": "text", "null": None})),
    "index_null_kind": (
        "text",
        lambda m: _edit_json(
            m / "vqdiffusion.json",
            condition={"kind": "text", "dim": 32, "seq_len": 77, "pad_token_id": 0, "null": "none"},
        ),
    ),
    "index_v1_class_null": ("class", _v1_class_index),
    "text_huge_mlp": ("text", lambda m: _edit_json(m / "text_encoder" / "config.json", intermediate_size=10**7)),
    "text_huge_layers": ("text", lambda m: _edit_json(m / "text_encoder" / "config.json", num_hidden_layers=10**9)),
    "text_nan": ("text", lambda m: _edit_weights(m / "text_encoder" / "model.safetensors", _nan_in_first_matrix)),
    "text_int": ("text", lambda m: _edit_weights(m / "text_encoder" / "model.safetensors", _as_int)),
    "text_deep_config": ("text", lambda m: _deep(m / "text_encoder" / "config.json", '{"a":', "}")),
    "truncated_weights": ("text", lambda m: (m / "denoiser" / "model.safetensors").write_bytes(b"\x00" * 10)),
}


# ---------------------------------------------------------------------------------------------------------
# Damaged files: reference statistics (.npz), networks, checkpoints, caption folders
# ---------------------------------------------------------------------------------------------------------
STATS_DIM = 8


def _npz(path: Path, **changes) -> None:
    """Reference statistics of ``STATS_DIM`` features (as ``--save-reference-stats`` writes), with ``changes``."""
    arrays = {
        "mu": np.zeros(STATS_DIM),
        "sigma": np.eye(STATS_DIM),
        "num_images": np.array(10),
        "meta": np.array(json.dumps({"format": "vqdiffusion-fid-reference"})),
    }
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


class _InceptionLike(torch.nn.Module):
    """The forward signature of NVIDIA's TorchScript Inception (never reached by the rows that use it)."""

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        return x.float().flatten(1)[:, :8]


class _NotInception(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript(path: Path, module: torch.nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the published Inception files are TorchScript
        torch.jit.save(torch.jit.script(module), str(path))


def _asymmetric() -> np.ndarray:
    sigma = np.eye(STATS_DIM)
    sigma[0, 1] = 1.0
    return sigma


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` 1-bit pixels (PIL reads the size before decoding anything)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    path.write_bytes(data + chunk(b"IEND", b""))


def _folder(path: Path, files: dict[str, str | bytes], images: tuple[str, ...] = ("a.png",)) -> None:
    """A folder holding 8x8 PNGs ``images`` and the text or bytes ``files``."""
    make_caption_folder(path, count=0)
    for name in images:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(path / name)
    for name, content in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())


def _bomb_folder(path: Path) -> None:
    _folder(path, {"a.txt": "a red square"}, images=())
    _png_header(path / "a.png", 20_000, 20_000)  # 400 megapixels


AUTHORS_K = 12  # codebook of the tiny authors' checkpoint


def _authors_checkpoint(path: Path, *, nan_ema: bool = False) -> None:
    """A tiny unconditional authors' checkpoint (DiffusionTransformer + PatchVQGAN copy)."""
    gen = torch.Generator().manual_seed(0)
    raw = authors.transformer_state("none", AUTHORS_K, gen)
    ema = authors.ema_of(raw, gen)
    if nan_ema:
        ema["transformer.to_logits.1.weight"][0, 0] = float("nan")
    authors.save_checkpoint(path, raw, ema, authors.codec_copy(authors.taming_state(AUTHORS_K, gen)))


def _authors_yaml(path: Path, replace: tuple[str, str] = ("", ""), **params) -> None:
    """The YAML of :func:`_authors_checkpoint`, with ``params`` overriding the transformer's and one text
    replacement."""
    authors.write_yaml(path, "none", AUTHORS_K, codec="ema_vqvae.PatchVQVAE", **params)
    if replace[0]:
        path.write_text(path.read_text().replace(*replace))


_T_LINE = f"diffusion_step: {authors.T}"

# name -> (file name, writer)
FILES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "npz_nan_mu": ("s.npz", lambda f: _npz(f, mu=np.full(STATS_DIM, np.nan))),
    "npz_negative_sigma": ("s.npz", lambda f: _npz(f, sigma=-1e6 * np.eye(STATS_DIM))),
    "npz_asymmetric_sigma": ("s.npz", lambda f: _npz(f, sigma=_asymmetric())),
    "npz_inf_sigma": ("s.npz", lambda f: _npz(f, sigma=np.full((STATS_DIM, STATS_DIM), np.inf))),
    "npz_string_mu": ("s.npz", lambda f: _npz(f, mu=np.array(["a"] * STATS_DIM))),
    "npz_meta_list": ("s.npz", lambda f: _npz(f, meta=np.array(["a", "b"]))),
    "npz_meta_string": ("s.npz", lambda f: _npz(f, meta=np.array("not json"))),
    "npz_meta_sha_int": ("s.npz", lambda f: _npz(f, meta=np.array(json.dumps({"inception": {"sha256": 5}})))),
    "npz_num_images_vector": ("s.npz", lambda f: _npz(f, num_images=np.array([3, 4]))),
    "npz_num_images_negative": ("s.npz", lambda f: _npz(f, num_images=np.array(-5))),
    "npz_features_shape": ("s.npz", lambda f: _npz(f, features=np.zeros((4, STATS_DIM + 1)))),
    "npz_empty": ("s.npz", lambda f: f.write_bytes(b"")),
    "npz_ok": ("s.npz", _npz),
    "authors_ckpt": ("model.pth", _authors_checkpoint),
    "authors_ckpt_nan_ema": ("model.pth", lambda f: _authors_checkpoint(f, nan_ema=True)),
    "authors_yaml": ("c.yaml", _authors_yaml),
    "authors_yaml_T_1e12": ("c.yaml", lambda f: _authors_yaml(f, (_T_LINE, "diffusion_step: 1000000000000"))),
    "authors_yaml_T_1e9": ("c.yaml", lambda f: _authors_yaml(f, (_T_LINE, "diffusion_step: 1000000000"))),
    "authors_yaml_layers_1e9": ("c.yaml", lambda f: _authors_yaml(f, n_layer=10**9)),
    "authors_yaml_not_utf8": ("c.yaml", lambda f: f.write_bytes(b"model: \xff\n")),
    "coco_image_id_list": (
        "captions.json",
        lambda f: f.write_text(json.dumps({"annotations": [{"image_id": [1, 2], "caption": "a red circle"}]})),
    ),
    "not_gzip": ("x.pth", lambda f: f.write_bytes(b"PK\x03\x04 not a tokenizer")),
    "bomb_folder": ("data", _bomb_folder),
    "csv_huge_caption": ("data", lambda f: _folder(f, {"captions.csv": "file,caption\na.png," + "x" * 200_000})),
    "csv_not_utf8": ("data", lambda f: _folder(f, {"captions.csv": b"file,caption\na.png,a \xff b\n"})),
    "jsonl_not_utf8": ("data", lambda f: _folder(f, {"captions.jsonl": b'{"file": "a.png", "caption": "\xff"}\n'})),
    "jsonl_outside": (
        "data",
        lambda f: _folder(
            f, {"captions.jsonl": '{"file": "a.png", "caption": "x"}\n{"file": "../b.png", "caption": "y"}'}
        ),
    ),
    "manifest_file_int": ("data", lambda f: _folder(f, {"manifest.json": '{"images": [{"file": 5, "prompt": "x"}]}'})),
    "torchscript_not_inception": ("net.pt", lambda f: _torchscript(f, _NotInception())),
    "torchscript_inception_like": ("net.pt", lambda f: _torchscript(f, _InceptionLike())),
}


class _Files:
    """``paths["f"][NAME]``: the damaged file NAME, written on first use."""

    def __init__(self, root: Path) -> None:
        self.root, self.built = root, {}

    def __getitem__(self, name: str) -> str:
        if name not in self.built:
            file_name, write = FILES[name]
            path = self.root / name / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            self.built[name] = str(path)
        return self.built[name]


def _edit_checkpoint(path: Path, edit: Callable[[dict, dict[str, torch.Tensor]], object]) -> None:
    """Rewrite a training checkpoint with ``edit(meta, tensors)``; a non-None return value replaces the meta."""
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    meta = json.loads(metadata["meta"])
    replaced = edit(meta, tensors)
    metadata["meta"] = json.dumps(meta if replaced is None else replaced)
    save_file(tensors, str(path), metadata=metadata)


def _without(meta: dict, key: str) -> None:
    del meta[key]


def _drop_optimizer_tensor(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    del tensors[next(key for key in sorted(tensors) if key.startswith("optimizer."))]


def _nan_ema(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in sorted(tensors) if k.startswith("ema.") and tensors[k].is_floating_point())
    tensors[key].view(-1)[0] = float("nan")


# name -> (the training run it starts from: "denoiser" or "vqvae", the edit of its checkpoint)
CHECKPOINTS: dict[str, tuple[str, Callable[[dict, dict[str, torch.Tensor]], object]]] = {
    "meta_empty": ("denoiser", lambda meta, t: {}),
    "meta_list": ("denoiser", lambda meta, t: []),
    "config_list": ("denoiser", lambda meta, t: meta.update(config=[1, 2])),
    "no_rng": ("denoiser", lambda meta, t: _without(meta, "rng")),
    "optimizer_tensor_missing": ("denoiser", _drop_optimizer_tensor),
    "nan_ema": ("denoiser", _nan_ema),
    "dim_1e20": ("denoiser", lambda meta, t: meta["denoiser_config"].update(dim=10**20)),
    "vq_meta_empty": ("vqvae", lambda meta, t: {}),
    "vq_meta_list": ("vqvae", lambda meta, t: []),
    "vq_config_list": ("vqvae", lambda meta, t: meta.update(config=[1, 2])),
    "vq_no_rng": ("vqvae", lambda meta, t: _without(meta, "rng")),
    "vq_optimizer_tensor_missing": ("vqvae", _drop_optimizer_tensor),
}


class _Runs:
    """``paths["c"][NAME]``: a training ``--out`` folder whose checkpoint is damaged as ``CHECKPOINTS[NAME]``
    says; the two base runs (one step each) are trained on first use."""

    def __init__(self, root: Path, tokens: Path, images: Path) -> None:
        self.root, self.tokens, self.images, self.built = root, tokens, images, {}

    def _base(self, kind: str) -> Path:
        out = self.root / f"base_{kind}"
        if not out.exists():
            flags = {"tokens": str(self.tokens), "images": str(self.images), "tmp": str(self.root)}
            argv = ["train", "{tokens}", *TRAIN_FLAGS] if kind == "denoiser" else TRAIN_VQVAE
            assert main([*(a.format(**flags) for a in argv), "--out", str(out), "--quiet"]) == 0
        return out

    def __getitem__(self, name: str) -> str:
        if name not in self.built:
            kind, edit = CHECKPOINTS[name]
            out = self.root / name
            shutil.copytree(self._base(kind), out)
            _edit_checkpoint(find_latest_checkpoint(out / "checkpoints"), edit)
            self.built[name] = str(out)
        return self.built[name]


def _tokens_without_vqvae(root: Path, tokens: Path) -> Path:
    """A copy of the token folder whose recorded VQ-VAE folder does not exist."""
    copy = root / "tokens_no_vqvae"
    if not copy.exists():
        shutil.copytree(tokens, copy)
        _edit_json(copy / "meta.json", vqvae_dir=str(root / "gone_vqvae"))
    return copy


class _Variants:
    """``paths["v"][NAME]``: the folder of variant NAME, built on first use."""

    def __init__(self, root: Path, bases: dict[str, Path]) -> None:
        self.root, self.bases, self.built = root, bases, {}

    def __getitem__(self, name: str) -> str:
        if name not in self.built:
            base, edit = VARIANTS[name]
            folder = self.root / name
            shutil.copytree(self.bases[base], folder)
            edit(folder)
            self.built[name] = str(folder)
        return self.built[name]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_clip_dirs):
    root = tmp_path_factory.mktemp("bad_inputs")
    components = tiny_text_components(tiny_clip_dirs)
    save_ours(components, root / "text")
    save_diffusers(components, root / "diffusers")
    torch.manual_seed(1)
    class_model = PipelineComponents(
        vqvae=components.vqvae,
        denoiser=Denoiser(DenoiserConfig.preset("tiny", cond_dim=None, num_class_labels=5)),
        schedule=components.schedule,
        null_class_label=4,
        defaults=SamplingOptions(num_inference_steps=3, guidance_scale=2.0),
    )
    save_ours(class_model, root / "class")
    (root / "afile").write_text("a regular file\n")
    files = root / "files"
    (files / "empty").mkdir(parents=True)
    (files / "prompts.txt").write_text("a red circle\na blue square\n")
    (files / "empty.txt").write_text("\n")
    _deep(files / "deep.json")
    read_only = root / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    tokens, _ = make_token_dir(root / "tokens_data")
    images = make_caption_folder(root / "images")
    bases = {"text": root / "text", "diffusers": root / "diffusers", "class": root / "class"}
    yield {
        **{name: str(path) for name, path in bases.items()},
        "v": _Variants(root / "variants", bases),
        "f": _Files(root / "damaged"),
        "c": _Runs(root / "runs", tokens, images),
        "tokens_no_vqvae": str(_tokens_without_vqvae(root, tokens)),
        "afile": str(root / "afile"),
        "files": str(files),
        "ro": str(read_only),
        "tokens": str(tokens),
        "images": str(images),
        "root": str(root),
    }
    read_only.chmod(0o755)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# The command-line table
# ---------------------------------------------------------------------------------------------------------
def gen(*extra: str, model: str = "{text}") -> list[str]:
    """``generate`` on a tiny model, 2 steps, into a fresh file unless ``extra`` says otherwise."""
    out = [] if "--output" in extra else ["--output", "{tmp}/out.png"]
    return ["generate", "a red circle", "--model", model, "--steps", "2", *out, *extra]


def ev(*extra: str) -> list[str]:
    out = [] if "--out" in extra else ["--out", "{tmp}/eval"]
    return ["eval", "--model", "{text}", "--n", "1", "--steps", "2", *out, *extra]


def ss(*extra: str, model: str = "{text}", prompts: bool = True) -> list[str]:
    """``sample-set`` on a tiny model, 2 steps."""
    out = [] if "--out" in extra else ["--out", "{tmp}/samples"]
    given = ["--prompts", "{files}/prompts.txt"] if prompts and "--prompts" not in extra else []
    return ["sample-set", "--model", model, *given, "--steps", "2", *out, *extra]


TRAIN = ["train", "{tokens}", "--preset", "tiny", "--train-text-model", "--cond-dim", "32", "--text-heads", "2"]
TRAIN += ["--text-max-length", "16", "--batch-size", "4", "--steps", "1", "--device", "cpu"]
TRAIN_VQVAE = ["train-vqvae", "{images}", "--image-size", "8", "--batch-size", "2", "--steps", "1", "--device", "cpu"]
FSQ = [*TRAIN_VQVAE, "--out", "{tmp}/r", "--quantizer", "fsq", "--fsq-levels", "4,3,2"]

SS = ["sample-set", "--model", "{text}", "--out", "{tmp}/s", "--quiet"]
FID = ["eval", "--suite", "fid", "--samples", "{images}", "--reference", "{images}", "--out", "{tmp}/e"]
CLIPSCORE = ["eval", "--suite", "clipscore", "--samples", "{images}", "--out", "{tmp}/e"]


def tok(name: str) -> list[str]:
    """``tokenize`` of the damaged data folder NAME."""
    return ["tokenize", f"{{f[{name}]}}", "--vqvae", "{text}/vqvae", "--out", "{tmp}/t", "--device", "cpu"]


def conv(yaml: str, ckpt: str = "authors_ckpt") -> list[str]:
    """``convert`` of an authors' checkpoint with the YAML ``yaml`` (both from ``FILES``)."""
    return ["convert", f"{{f[{ckpt}]}}", "{tmp}/c", "--config", f"{{f[{yaml}]}}"]


def resume(name: str) -> list[str]:
    """``train --resume`` on the damaged run NAME."""
    return ["train", "{tokens}", "--out", f"{{c[{name}]}}", "--resume", "--device", "cpu"]


def vq_resume(name: str) -> list[str]:
    return ["train-vqvae", "{images}", "--out", f"{{c[{name}]}}", "--resume", "--device", "cpu"]


def export(name: str) -> list[str]:
    return ["export", f"{{c[{name}]}}", "{tmp}/m"]


def fid_ref(name: str) -> list[str]:
    """``eval --suite fid`` against the damaged reference statistics NAME (checked before the network loads)."""
    return [*FID, "--reference", f"{{f[{name}]}}", "--inception-weights", "{afile}"]


ROOT_SKIP = pytest.mark.skipif(IS_ROOT, reason="root may write into read-only folders")
CUDA_ONLY_SKIP = pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")
DEV_FULL_SKIP = pytest.mark.skipif(not HAS_DEV_FULL, reason="no /dev/full character device")
SYS_SKIP = pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="no /sys")


def edit_cmd(command: str) -> list[str]:
    """An editing command on the tiny text model into a fresh file, up to ``--image``'s value."""
    return [command, "a red circle", "--model", "{text}", "--output", "{tmp}/out.png", "--image"]


def row(id_: str, argv: list[str], words: tuple[str, ...], code: int = 2, marks=()):
    return pytest.param(argv, code, words, id=id_, marks=marks)


CASES = [
    # -- prompts, flags and sampling values ---------------------------------------------------------
    row("empty-prompt", ["generate", "   ", "--model", "{text}"], ("prompt is empty",)),
    # $'a \xff b': Python decodes argv bytes that are not UTF-8 to lone surrogates
    row("prompt-not-utf8", ["generate", "a \udcff b", "--model", "{text}"], ("0xff", "position 2", "UTF-8")),
    row("argparse-not-a-number", gen("--steps", "abc"), ("vqdiffusion generate", "--steps", "'abc'", "--help")),
    row("argparse-bad-choice", gen("--sampler", "greedy"), ("--sampler", "'greedy'", "choose from")),
    row("argparse-missing-argument", ["export"], ("vqdiffusion export", "required", "--help")),
    row("argparse-unknown-command", ["nope"], ("'nope'", "vqdiffusion --help")),
    row("steps-0", gen("--steps", "0"), ("--steps", "positive integer")),
    row("steps-above-T", gen("--steps", "101"), ("--steps", "[1, 100]")),
    row("truncation-0", gen("--truncation", "0"), ("--truncation", "(0, 1]")),
    row("truncation-1.2", gen("--truncation", "1.2"), ("--truncation",)),
    row("num-images-0", gen("--num-images", "0"), ("--num-images", ">= 1")),
    row("num-images-huge-grid", gen("--num-images", str(10**12)), ("a grid of 1000000000000 images", "to a folder")),
    row("num-images-huge", gen("--num-images", str(10**12), "--output", "{tmp}/many"), ("images need about", "fewer")),
    row("batch-size-0", gen("--batch-size", "0"), ("--batch-size", ">= 1")),
    row("guidance-1e308", gen("--guidance", "1e308"), ("--guidance", "[0, 1000]", "1e+308")),
    row("guidance-1e30", gen("--guidance", "1e30"), ("--guidance", "[0, 1000]", "1e+30")),
    row("guidance-inf", gen("--guidance", "inf"), ("--guidance", "inf")),
    row("guidance-nan", gen("--guidance", "nan"), ("--guidance", "nan")),
    row("guidance-negative", gen("--guidance", "-1"), ("--guidance",)),
    row("prior-weight-negative", gen("--prior-weight", "-1"), ("--prior-weight",)),
    row("prior-weight-huge", gen("--sampler", "purity", "--prior-weight", "1e30"), ("--prior-weight", "1000")),
    row("prior-weight-ancestral", gen("--prior-weight", "1"), ("prior_weight", "purity")),
    row("temperature-0", gen("--temperature", "0"), ("--temperature",)),
    row("temperature-tiny", gen("--temperature", "1e-300"), ("--temperature", "0.001")),
    row("tokens-per-call-ancestral", gen("--tokens-per-call", "4"), ("tokens_per_call", "uniform', 'purity")),
    row("unsupported-image-type", gen("--output", "{tmp}/out.txt"), ("unsupported image type", ".txt")),
    # -- output paths ---------------------------------------------------------------------------------
    row("output-empty", gen("--output", ""), ("--output is empty", ".png")),
    row("output-parent-is-file", gen("--output", "{afile}/o.png"), ("afile is a file, not a folder",)),
    row("output-deep-parent-is-file", gen("--output", "{afile}/a/b/o.png"), ("afile is a file",)),
    row("output-is-file-without-suffix", gen("--output", "{afile}"), ("without an image suffix", ".png")),
    row(
        "output-folder-is-file-numbered", gen("--num-images", "2", "--output", "{afile}"), ("without an image suffix",)
    ),
    row("output-is-folder-with-suffix", gen("--output", "{tmp}/dir.png", "--num-images", "1"), ("is a folder",)),
    row("output-read-only-dir", gen("--output", "{ro}/o.png"), ("permission denied",), marks=ROOT_SKIP),
    row("output-read-only-subdir", gen("--output", "{ro}/sub/o.png"), ("permission denied",), marks=ROOT_SKIP),
    row(
        "output-read-only-numbered",
        gen("--num-images", "2", "--output", "{ro}"),
        ("permission denied",),
        marks=ROOT_SKIP,
    ),
    row("output-sys", gen("--output", "/sys/o.png"), ("/sys/o.png", "choose a location"), marks=SYS_SKIP),
    row("output-sys-subdir", gen("--output", "/sys/vqd/o.png"), ("/sys/vqd", "choose a location"), marks=SYS_SKIP),
    row("output-dev-full", gen("--output", "/dev/full"), ("no space left", "/dev/full"), marks=DEV_FULL_SKIP),
    row("eval-out-parent-is-file", ev("--out", "{afile}/e"), ("--out", "afile is a file")),
    row("eval-out-is-file", ev("--out", "{afile}"), ("--out", "is a file, not a folder")),
    row("eval-out-read-only", ev("--out", "{ro}/e"), ("permission denied",), marks=ROOT_SKIP),
    row("convert-out-parent-is-file", ["convert", "{text}", "{afile}/c"], ("afile is a file",)),
    row("convert-out-is-file", ["convert", "{text}", "{afile}"], ("is a file, not a folder",)),
    row("convert-out-read-only", ["convert", "{text}", "{ro}/c"], ("permission denied",), marks=ROOT_SKIP),
    row("convert-out-not-empty", ["convert", "{text}", "{root}"], ("not empty",)),
    row("train-out-parent-is-file", [*TRAIN, "--out", "{afile}/run"], ("--out", "afile is a file")),
    row("train-out-read-only", [*TRAIN, "--out", "{ro}/run"], ("permission denied",), marks=ROOT_SKIP),
    row("train-vqvae-out-parent-is-file", [*TRAIN_VQVAE, "--out", "{afile}/run"], ("--out", "afile is a file")),
    # -- train-vqvae --quantizer fsq: the learned codebook's settings have no meaning for the fixed grid
    row("fsq-codebook-init", [*FSQ, "--codebook-init", "kmeans"], ("codebook_init='kmeans'", "--codebook-init", "fsq")),
    row("fsq-code-restart", [*FSQ, "--code-restart", "distance"], ("code_restart='distance'", "--code-restart")),
    row("fsq-codebook-l2", [*FSQ, "--codebook-l2"], ("codebook_l2=True", "--codebook-l2", "fixed grid")),
    row("fsq-beta", [*FSQ, "--beta", "0.5"], ("commitment_beta=0.5", "--beta")),
    row("fsq-dead-codes", [*FSQ, "--dead-code-threshold", "5"], ("dead_code_threshold=5",)),
    row("fsq-codebook-size", [*FSQ, "--codebook-size", "256"], ("num_embeddings=256", "prod(fsq_levels)=24")),
    row("fsq-embed-dim", [*FSQ, "--embed-dim", "8"], ("embed_dim=8", "len(fsq_levels)=3")),
    row("fsq-no-levels", [*TRAIN_VQVAE, "--out", "{tmp}/r", "--quantizer", "fsq"], ("needs fsq_levels",)),
    row("fsq-level-1", [*TRAIN_VQVAE, "--out", "{tmp}/r", "--quantizer", "fsq", "--fsq-levels", "4,1"], (">= 2",)),
    row("fsq-levels-without-fsq", [*TRAIN_VQVAE, "--out", "{tmp}/r", "--fsq-levels", "4,3"], ("quantizer='fsq'",)),
    row("fsq-levels-garbage", [*FSQ, "--fsq-levels", "4,x"], ("--fsq-levels", "comma-separated integers")),
    row("quantizer-unknown", [*TRAIN_VQVAE, "--out", "{tmp}/r", "--quantizer", "lfq"], ("quantizer", "'lfq'")),
    # -- eval-tokenizer and the ceiling flag
    row("eval-tokenizer-missing", ["eval-tokenizer", "{tmp}/nope"], ("VQ-VAE folder not found",)),
    row("eval-tokenizer-not-vqvae", ["eval-tokenizer", "{files}"], ("is not a VQ-VAE folder",)),
    row("eval-tokenizer-n-0", ["eval-tokenizer", "{text}", "--n", "0"], ("--n must be >= 1",)),
    row("eval-tokenizer-n-huge", ["eval-tokenizer", "{text}", "--n", str(10**12)], ("--n must be at most",)),
    row("eval-tokenizer-device-foo", ["eval-tokenizer", "{text}", "--device", "foo"], ("device 'foo'",)),
    row("eval-tokenizer-out-is-file", ["eval-tokenizer", "{text}", "--out", "{afile}"], ("is a file, not a folder",)),
    row("eval-ceiling-not-shapes", [*CLIPSCORE, "--tokenizer-ceiling"], ("--tokenizer-ceiling", "--suite shapes")),
    row(
        "tokenize-out-parent-is-file",
        ["tokenize", "{images}", "--vqvae", "{text}/vqvae", "--out", "{afile}/t"],
        ("afile",),
    ),
    row("train-resume-nothing", [*TRAIN, "--out", "{tmp}/fresh", "--resume"], ("no checkpoint",)),
    row("resume-meta-empty", resume("meta_empty"), ("step_00000001.safetensors", "has no 'kind'", "'denoiser'")),
    row("resume-meta-list", resume("meta_list"), ("metadata is a JSON list, not an object",)),
    row("resume-config-list", resume("config_list"), ("'config' is a JSON list, not an object",)),
    row("resume-no-rng", resume("no_rng"), ("'rng' is missing", "resume from an earlier checkpoint")),
    row("resume-optimizer-tensor-missing", resume("optimizer_tensor_missing"), ("lacks the tensor 'optimizer.",)),
    row("resume-nan-ema", resume("nan_ema"), ("ema.", "NaN or infinite", "diverged")),
    row(
        "train-vqvae-folder-gone",
        ["train", "{tokens_no_vqvae}", *TRAIN[2:], "--out", "{tmp}/run"],
        ("gone_vqvae", "which is gone", "tokenize"),
    ),
    row("vq-resume-meta-empty", vq_resume("vq_meta_empty"), ("has no 'kind'", "'vqvae'")),
    row("vq-resume-meta-list", vq_resume("vq_meta_list"), ("metadata is a JSON list",)),
    row("vq-resume-config-list", vq_resume("vq_config_list"), ("'config' is a JSON list",)),
    row("vq-resume-no-rng", vq_resume("vq_no_rng"), ("'rng' is missing",)),
    row("vq-resume-optimizer-tensor-missing", vq_resume("vq_optimizer_tensor_missing"), ("lacks the tensor",)),
    row("export-meta-empty", export("meta_empty"), ("has no 'kind'",)),
    row("export-meta-list", export("meta_list"), ("metadata is a JSON list",)),
    row("export-config-list", export("config_list"), ("'config' is a JSON list",)),
    row("export-no-rng", export("no_rng"), ("'rng' is missing",)),
    row("export-optimizer-tensor-missing", export("optimizer_tensor_missing"), ("lacks the tensor",)),
    row("export-nan-ema", export("nan_ema"), ("NaN or infinite",)),
    row("export-dim-1e20", export("dim_1e20"), ("dim=100000000000000000000", "limit")),
    row("train-sample-steps-above-T", [*TRAIN, "--out", "{tmp}/r", "--sample-steps", "1000"], ("sample_steps=1000",)),
    row("train-pad-token-negative", [*TRAIN, "--out", "{tmp}/r", "--text-pad-token-id=-1"], ("text_pad_token_id",)),
    row("train-min-lr-above-lr", [*TRAIN, "--out", "{tmp}/r", "--lr", "1e-4", "--min-lr", "1e-3"], ("min_lr=0.001",)),
    row("convert-yaml-T-1e12", conv("authors_yaml_T_1e12"), ("num_timesteps=1000000000000", "limit")),
    row("convert-yaml-T-1e9", conv("authors_yaml_T_1e9"), ("T=1000000000", "does not match the checkpoint")),
    row("convert-yaml-layers-1e9", conv("authors_yaml_layers_1e9"), ("n_layer=1000000000", "holds 2 blocks")),
    row("convert-yaml-not-utf8", conv("authors_yaml_not_utf8"), ("c.yaml is not UTF-8", "offset 7")),
    row("convert-nan-ema", conv("authors_yaml", ckpt="authors_ckpt_nan_ema"), ("ema weights", "to_logits.1.weight")),
    row(
        "convert-codes-map-unused",
        [*conv("authors_yaml"), "--codes-map", "{afile}"],
        ("--codes-map", "no quantize_number", "leave --codes-map out"),
    ),
    row("convert-tokenizer-not-gzip", [*conv("authors_yaml"), "--tokenizer", "{f[not_gzip]}"], ("x.pth", "not a gzip")),
    row("export-missing-checkpoint", ["export", "{tmp}/nope.safetensors", "{tmp}/m"], ("not found",)),
    row("export-not-a-checkpoint", ["export", "{afile}", "{tmp}/m"], ("afile",)),
    row("make-shapes-n-0", ["make-shapes", "{tmp}/s", "--n", "0"], ("--n", ">= 1")),
    row("make-shapes-n-huge", ["make-shapes", "{tmp}/s", "--n", str(10**12)], ("1000000000000 images", "10000000")),
    row("make-shapes-seed-negative", ["make-shapes", "{tmp}/s", "--seed=-1"], ("--seed", "[0, 9223372036854775807]")),
    row("make-shapes-not-empty", ["make-shapes", "{root}", "--n", "1"], ("not empty", "--overwrite")),
    row("export-out-not-empty", ["export", "{afile}", "{root}"], ("model folder", "not empty", "--overwrite")),
    row("eval-n-huge", ev("--n", str(10**12)), ("--n must be at most 100000", "1000000000000")),
    row(
        "fid-kid-subsets-huge",
        [*FID, "--inception-weights", "{afile}", "--kid", "--kid-subsets", str(10**12)],
        ("--kid-subsets must be at most 10000",),
    ),
    row("seed-huge", gen("--seed", str(10**30)), ("--seed", "must be an integer in [0, 9223372036854775807]")),
    row("seed-float", gen("--seed", "1e30"), ("--seed", "'1e30'")),
    row("seed-negative", gen("--seed=-1"), ("--seed", "got -1")),
    row("sample-set-seed-huge", ss("--seed", str(10**30)), ("--seed", "9223372036854775807")),
    row("train-seed-huge", [*TRAIN, "--out", "{tmp}/r", "--seed", str(10**30)], ("--seed",)),
    row("make-shapes-out-parent-is-file", ["make-shapes", "{afile}/s", "--n", "1"], ("afile",)),
    # -- sample-set, sheet and the image-folder eval suites -------------------------------------------
    row("sample-set-out-parent-is-file", ss("--out", "{afile}/s"), ("--out", "afile is a file")),
    row("sample-set-prompts-empty", ss("--prompts", "{files}/empty.txt"), ("holds no prompts",)),
    row("sample-set-prompts-deep-json", ss("--prompts", "{files}/deep.json"), ("deep.json", "not valid JSON")),
    row("sample-set-num-huge", ss("--num-images", str(10**12)), ("--num-images 1000000000000", "sample fewer images")),
    row("sample-set-image-id-list", ss("--prompts", "{f[coco_image_id_list]}"), ("annotation 0", "image_id [1, 2]")),
    row("sample-set-batch-size-0", ss("--batch-size", "0"), ("--batch-size", ">= 1")),
    row("sample-set-guidance-1e30", ss("--guidance", "1e30"), ("--guidance",)),
    row("sample-set-labels-garbage", ss("--class-labels", "x-3", model="{class}", prompts=False), ("'x-3'",)),
    row(
        "sample-set-labels-huge",
        ss("--class-labels", "0-1000000000000", model="{class}", prompts=False),
        ("more than",),
    ),
    row("sheet-thumb-huge", ["sheet", "{images}", "--thumb", "1000000", "--out", "{tmp}/s.png"], ("smaller --thumb",)),
    row("sheet-out-parent-is-file", ["sheet", "{images}", "--out", "{afile}/s.png"], ("afile is a file",)),
    row("fid-needs-flags", ["eval", "--suite", "fid"], ("--suite fid needs",)),
    row("fid-device-meta", [*FID, "--inception-weights", "{afile}", "--device", "meta"], ("device 'meta'",)),
    row("fid-out-parent-is-file", [*FID, "--inception-weights", "{afile}", "--out", "{afile}/e"], ("afile is a file",)),
    row("clipscore-device-foo", [*CLIPSCORE, "--clip", "{tmp}/no", "--device", "foo"], ("device 'foo'",)),
    # -- devices ----------------------------------------------------------------------------------------
    row("device-foo", gen("--device", "foo"), ("device 'foo'", "use cpu")),
    row("device-meta", gen("--device", "meta"), ("device 'meta'", "not supported")),
    row("device-mps", gen("--device", "mps"), ("device 'mps'",)),
    row("device-empty", gen("--device", ""), ("device ''", "empty")),
    row("device-cuda", gen("--device", "cuda"), ("device 'cuda'", "CUDA is not available"), marks=CUDA_ONLY_SKIP),
    row("device-cuda-index", gen("--device", "cuda:99"), ("cuda:99",)),
    row("eval-device-foo", ev("--device", "foo"), ("device 'foo'",)),
    row("eval-device-cuda", ev("--device", "cuda"), ("CUDA is not available",), marks=CUDA_ONLY_SKIP),
    row("eval-n-0", ev("--n", "0"), ("--n", ">= 1")),
    row("train-device-foo", [*TRAIN, "--out", "{tmp}/run", "--device", "foo"], ("device 'foo'",)),
    row("train-vqvae-device-meta", [*TRAIN_VQVAE, "--out", "{tmp}/run", "--device", "meta"], ("device 'meta'",)),
    row(
        "tokenize-device-foo",
        ["tokenize", "{images}", "--vqvae", "{text}/vqvae", "--out", "{tmp}/t", "--device", "x"],
        ("device 'x'",),
    ),
    # -- model folders --------------------------------------------------------------------------------
    row("model-missing", gen(model="{tmp}/nope"), ("not found",)),
    row("model-is-file", gen(model="{afile}"), ("is a file, not a model directory",)),
    row("model-builtin-unknown", gen(model="builtin:nope"), ("unknown built-in model",)),
    row("info-missing", ["info", "{tmp}/nope"], ("not found",)),
    row("model-truncated-weights", ["info", "{v[truncated_weights]}"], ("not a valid safetensors file",)),
    row("config-nested-deep", gen(model="{v[deep_config]}"), ("config.json", "nested too deeply")),
    row("index-nested-deep", ["info", "{v[deep_index]}"], ("vqdiffusion.json", "nested too deeply")),
    row("vqvae-config-nested-deep", ["info", "{v[deep_vqvae_config]}"], ("vqvae", "nested too deeply")),
    row(
        "diffusers-index-nested-deep", ["info", "{v[deep_diffusers_index]}"], ("model_index.json", "nested too deeply")
    ),
    row("config-T-1e9", ["info", "{v[huge_T]}"], ("timestep_embedding", "(100, 32)", "(1000000000, 32)")),
    row("schedule-T-1e9", ["info", "{v[huge_T_schedule]}"], ("schedule.json", "num_timesteps=1000000000", "T=100")),
    row("config-width-1e6", ["info", "{v[huge_width]}"], ("shape", "(1000000,")),
    row("config-layers-1e9", ["info", "{v[huge_layers]}"], ("num_layers=1000000000", "holds only")),
    row("config-codebook-1e10", ["info", "{v[huge_codebook]}"], ("num_embeddings=10000000000", "above the limit")),
    row("vqvae-blocks-1e9", ["info", "{v[huge_vq_blocks]}"], ("layers_per_block", "holds only")),
    row("diffusers-T-1e9", ["info", "{v[huge_diffusers_T]}"], ("transformer", "1000000000")),
    row("diffusers-width-1e6", ["info", "{v[huge_diffusers_width]}"], ("transformer", "shape")),
    row("config-dim-1e20", ["info", "{v[huge_dim]}"], ("dim=100000000000000000000", "above the limit 2147483647")),
    row("config-mlp-ratio-digits", gen(model="{v[mlp_ratio_digits]}"), ("mlp_ratio", "402-digit integer", "limit")),
    row("config-mlp-ratio-1e308", ["info", "{v[mlp_ratio_1e308]}"], ("dim * mlp_ratio=inf", "limit")),
    row("config-norm-eps-inf", gen(model="{v[norm_eps_inf]}"), ("DenoiserConfig", "norm_eps", "(0, 0.1]", "inf")),
    row("config-norm-eps-1e300", ["info", "{v[norm_eps_1e300]}"], ("norm_eps", "1e+300")),
    row("vqvae-norm-eps-inf", ["info", "{v[vqvae_norm_eps_inf]}"], ("VQVAEConfig", "norm_eps", "inf")),
    row("vqvae-norm-eps-1e300", gen(model="{v[vqvae_norm_eps_1e300]}"), ("VQVAEConfig", "norm_eps", "1e+300")),
    row("train-mlp-ratio-1e308", [*TRAIN, "--out", "{tmp}/run", "--mlp-ratio", "1e308"], ("mlp_ratio", "limit")),
    row("weights-nan", gen(model="{v[nan_weights]}"), ("denoiser", "NaN or infinite", "re-export")),
    row("vqvae-weights-nan", ["info", "{v[nan_vqvae]}"], ("vqvae", "NaN or infinite")),
    row("null-condition-nan", ["info", "{v[nan_null]}"], ("null_condition.safetensors", "NaN or infinite")),
    row("diffusers-weights-nan", ["info", "{v[nan_diffusers]}"], ("transformer", "NaN or infinite")),
    row("text-encoder-mlp-1e7", ["info", "{v[text_huge_mlp]}"], ("fc1", "(64,)", "(10000000,)")),
    row("text-encoder-layers-1e9", ["info", "{v[text_huge_layers]}"], ("num_hidden_layers=1000000000",)),
    row("text-encoder-nan", ["info", "{v[text_nan]}"], ("text_encoder", "NaN or infinite")),
    row("text-encoder-int", ["info", "{v[text_int]}"], ("text_encoder", "not as floating point")),
    row("text-encoder-config-deep", ["info", "{v[text_deep_config]}"], ("text_encoder", "config.json")),
    row("weights-int", gen(model="{v[int_weights]}"), ("torch.int32", "not as floating point")),
    # finite but absurd weights (x 1e30): the sampling and decoding guards name the component, no image
    row("denoiser-x1e30", gen(model="{v[huge_denoiser]}"), ("denoiser's log-probabilities are NaN", "re-export")),
    row("null-x1e30", gen(model="{v[huge_null]}"), ("null condition", "NaN", "guidance_scale=1")),
    row("vqvae-x1e30", gen(model="{v[huge_vqvae]}"), ("VQ-VAE decoder", "NaN or infinite pixels", "re-export")),
    row("null-condition-int", ["info", "{v[int_null]}"], ("null_condition.safetensors", "floating point")),
    row("defaults-nan", ["info", "{v[defaults_nan]}"], ("defaults.json", "guidance_scale", "nan")),
    row("defaults-steps-above-T", ["info", "{v[defaults_steps]}"], ("defaults.json", "num_inference_steps", "1000")),
    row("defaults-sampler", ["info", "{v[defaults_sampler]}"], ("defaults.json", "sampler", "greedy")),
    row("defaults-guidance-1e30", ["info", "{v[defaults_guidance]}"], ("defaults.json", "guidance_scale")),
    row("defaults-temperature", ["info", "{v[defaults_temperature]}"], ("defaults.json", "temperature")),
    row("index-null-none", ["info", "{v[index_null]}"], ("vqdiffusion.json", "null must be one of")),
    row("index-null-none-text", ["info", "{v[index_null_kind]}"], ("vqdiffusion.json", "null='none'")),
    row("index-v1-null-on-class", ["info", "{v[index_v1_class_null]}"], ("null_condition is for text models",)),
    # -- sample-set, eval --suite fid / clipscore, sheet -------------------------------------------------
    row("ss-text-needs-prompts", [*SS, "--class-labels", "0-3"], ("text model", "--prompts")),
    row("ss-prompts-missing", [*SS, "--prompts", "{tmp}/nope.txt"], ("prompts file not found",)),
    row("ss-prompts-binary", [*SS, "--prompts", "{text}/denoiser/model.safetensors"], ("not UTF-8 text",)),
    row("ss-num-0", [*SS, "--prompts", "{afile}", "--num-images", "0"], ("--num-images", ">= 1")),
    row("ss-out-is-file", [*SS, "--prompts", "{afile}", "--out", "{afile}"], ("--out", "is a file")),
    row("ss-device-foo", [*SS, "--prompts", "{afile}", "--device", "foo"], ("device 'foo'",)),
    row("ss-class-needs-labels", [*SS, "--model", "{class}", "--prompts", "{afile}"], ("class-conditional",)),
    row("ss-label-out-of-range", [*SS, "--model", "{class}", "--class-labels", "0-9"], ("not a label of", "0..3")),
    row("ss-label-syntax", [*SS, "--model", "{class}", "--class-labels", "3-1"], ("not a label or a range",)),
    row("fid-needs-weights", FID, ("needs --inception-weights",)),
    row("fid-weights-missing", [*FID, "--inception-weights", "{tmp}/no.pt"], ("Inception weights file not found",)),
    row("fid-weights-not-a-network", [*FID, "--inception-weights", "{afile}"], ("neither a TorchScript Inception",)),
    row("fid-reference-missing", [*FID, "--reference", "{tmp}/no", "--inception-weights", "{afile}"], ("not found",)),
    row("fid-kid-subsets-0", [*FID, "--inception-weights", "{afile}", "--kid-subsets", "0"], ("--kid-subsets",)),
    row("fid-batch-size-0", [*FID, "--inception-weights", "{afile}", "--batch-size", "0"], ("--batch-size", ">= 1")),
    row("fid-reference-nan-mu", fid_ref("npz_nan_mu"), ("s.npz", "'mu' holds NaN or infinite", "recompute")),
    row("fid-reference-negative-sigma", fid_ref("npz_negative_sigma"), ("'sigma' has a negative eigenvalue",)),
    row("fid-reference-asymmetric-sigma", fid_ref("npz_asymmetric_sigma"), ("'sigma' is not symmetric",)),
    row("fid-reference-inf-sigma", fid_ref("npz_inf_sigma"), ("'sigma' holds NaN or infinite",)),
    row("fid-reference-string-mu", fid_ref("npz_string_mu"), ("'mu' holds <U1 values, not real numbers",)),
    row("fid-reference-meta-list", fid_ref("npz_meta_list"), ("'meta' is not the JSON object",)),
    row("fid-reference-meta-string", fid_ref("npz_meta_string"), ("'meta' is not the JSON object",)),
    row("fid-reference-meta-sha-int", fid_ref("npz_meta_sha_int"), ("'meta' is not the JSON object",)),
    row("fid-reference-num-images-vector", fid_ref("npz_num_images_vector"), ("'num_images'", "[3, 4]")),
    row("fid-reference-num-images-negative", fid_ref("npz_num_images_negative"), ("'num_images'", ">= 2", "-5")),
    row("fid-reference-features-shape", fid_ref("npz_features_shape"), ("'features' has shape (4, 9)", "[n, 8]")),
    row("fid-reference-empty-file", fid_ref("npz_empty"), ("s.npz", "an empty file", "--save-reference-stats")),
    row(
        "fid-weights-torchscript-not-inception",
        [*FID, "--inception-weights", "{f[torchscript_not_inception]}"],
        ("net.pt", "not the Inception", "return_features"),
    ),
    row(
        "fid-samples-decompression-bomb",
        [
            *FID,
            "--samples",
            "{f[bomb_folder]}",
            "--reference",
            "{f[npz_ok]}",
            "--batch-size",
            "1",
            "--inception-weights",
        ]
        + ["{f[torchscript_inception_like]}"],
        ("a.png", "decompression bomb", "resize it"),
    ),
    row("clipscore-needs-clip", CLIPSCORE, ("needs --clip",)),
    row("clipscore-clip-missing", [*CLIPSCORE, "--clip", "{tmp}/no"], ("CLIP model folder not found",)),
    row("clipscore-not-clip", [*CLIPSCORE, "--clip", "{text}"], ("not a CLIP model folder",)),
    row(
        "clipscore-samples-missing",
        [*CLIPSCORE, "--samples", "{tmp}/no", "--clip", "{text}/text_encoder"],
        ("samples folder", "not found"),
    ),
    row("sheet-decompression-bomb", ["sheet", "{f[bomb_folder]}", "--out", "{tmp}/s.png"], ("a.png", "resize it")),
    row("sheet-manifest-file-int", ["sheet", "{f[manifest_file_int]}", "--out", "{tmp}/s.png"], ("images[0]", "5")),
    row("sheet-root-folder", ["sheet", "/"], ("'/'", "--out")),
    row(
        "sheet-csv-huge-caption", ["sheet", "{f[csv_huge_caption]}", "--out", "{tmp}/s.png"], ("captions.csv", "131072")
    ),
    row("sheet-jsonl-not-utf8", ["sheet", "{f[jsonl_not_utf8]}", "--out", "{tmp}/s.png"], ("is not UTF-8",)),
    row("tokenize-csv-huge-caption", tok("csv_huge_caption"), ("captions.csv", "after line 1", "131072", "shorten")),
    row("tokenize-csv-not-utf8", tok("csv_not_utf8"), ("captions.csv is not UTF-8", "offset 21")),
    row("tokenize-jsonl-not-utf8", tok("jsonl_not_utf8"), ("captions.jsonl is not UTF-8", "save it as UTF-8")),
    row("tokenize-jsonl-outside", tok("jsonl_outside"), ("captions.jsonl:2", "'../b.png' is outside the data folder")),
    row("sheet-missing", ["sheet", "{tmp}/no"], ("not found",)),
    row("sheet-not-a-folder", ["sheet", "{afile}"], ("not a folder of images",)),
    row("sheet-no-images", ["sheet", "{tmp}", "--out", "{tmp}/s.png"], ("holds no images",)),
    row("sheet-not-png", ["sheet", "{images}", "--out", "{tmp}/s.jpg"], (".png",)),
    row("sheet-thumb-2", ["sheet", "{images}", "--thumb", "2", "--out", "{tmp}/s.png"], ("thumb >= 8",)),
    row("demo-port", ["demo", "--port", "-1"], ("--port must be in [0, 65535], got -1",)),
    row("demo-device-meta", ["demo", "--device", "meta"], ("device 'meta'",)),
    row(
        "demo-host-not-here", ["demo", "--host", "192.0.2.1"], ("--host '192.0.2.1'", "cannot serve on it", "127.0.0.1")
    ),
    row(
        "generate-hub-not-cached",
        ["generate", "x", "--model", "acme/absent", "--local-files-only", "--cache-dir", "{tmp}/hub"],
        ("acme/absent (revision main) is not in the Hugging Face cache", "local_files_only"),
    ),
    row("generate-label-for-text", ["generate", "--model", "{text}", "--class-label", "1"], ("text-conditional",)),
    row("generate-prompt-for-class", ["generate", "a cat", "--model", "{class}"], ("class-conditional",)),
    # -- editing (the full table: tests/test_cli_editing.py) ---------------------------------------------------
    row("inpaint-no-mask", [*edit_cmd("inpaint"), "{afile}"], ("--mask MASK.png or --box", "neither")),
    row("inpaint-missing-image", [*edit_cmd("inpaint"), "{tmp}/no.png", "--box", "0,0,4,4"], ("no such file",)),
    row("inpaint-image-folder", [*edit_cmd("inpaint"), "{tmp}/dir.png", "--box", "0,0,4,4"], ("is a folder",)),
    row("inpaint-not-an-image", [*edit_cmd("inpaint"), "{afile}", "--box", "0,0,4,4"], ("not a readable image",)),
    row("outpaint-offset", [*edit_cmd("outpaint"), "{afile}", "--offset", "1"], ("--offset", "x,y")),
    row("variation-strength", [*edit_cmd("variation"), "{afile}", "--strength", "2"], ("--strength", "(0, 1]")),
    # -- aMUSEd's micro-conditions: values checked before the model loads; a model without them refuses them
    row("micro-on-vq-diffusion", gen("--aesthetic-score", "6"), ("--aesthetic-score", "no micro-conditions", "drop")),
    row("micro-on-vq-diffusion-set", ss("--crop-coords", "0,0"), ("--crop-coords", "no micro-conditions")),
    row("aesthetic-nan", gen("--aesthetic-score", "nan"), ("--aesthetic-score must be a finite number", "nan")),
    row("aesthetic-not-a-number", gen("--aesthetic-score", "high"), ("--aesthetic-score", "'high'")),
    row("crop-negative", gen("--crop-coords=-1,0"), ("--crop-coords must be two finite numbers >= 0", "(-1, 0)")),
    row("crop-not-numbers", gen("--crop-coords", "a,b"), ("--crop-coords", "expected two numbers", "'a,b'")),
    row("crop-one-number", ss("--crop-coords", "3"), ("--crop-coords", "expected two numbers")),
    row("orig-size-zero", ss("--orig-size", "0,256"), ("--orig-size must be two finite numbers > 0",)),
    row("orig-size-inf", gen("--orig-size", "inf,256"), ("--orig-size must be two finite numbers",)),
    row(
        "micro-on-edit",
        [*edit_cmd("variation"), "{afile}", "--strength", "0.5", "--aesthetic-score", "inf"],
        ("--aesthetic-score must be a finite number",),
    ),
]


def _format(argv: list[str], paths: dict, tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, **paths) for a in argv]


@pytest.mark.parametrize(("argv", "code", "words"), CASES)
def test_bad_input_is_one_line(paths, tmp_path, capsys, argv, code, words) -> None:
    (tmp_path / "dir.png").mkdir()
    args = _format(argv, paths, tmp_path)
    if args[0] in ("generate", "eval", "train", "train-vqvae", "tokenize", "sample-set"):
        args.append("--quiet")
    assert main(args) == code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out.png").exists()  # nothing written on failure


def test_table_covers_every_command() -> None:
    """Each command of the CLI has rows in the table (a new command needs its bad inputs here too)."""
    from vqdiffusion.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = set(sub.choices)
    covered = {p.values[0][0] for p in CASES}
    assert commands - covered == set()


def test_help_still_prints_the_usage(capsys) -> None:
    """Only argparse's errors lose the usage block: ``--help`` prints it and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: vqdiffusion generate")


def test_a_traceback_is_kept_for_bugs(monkeypatch) -> None:
    """Only user errors become one line: a bug (here a TypeError) still raises."""
    import vqdiffusion.cli.generate as generate

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(generate, "check_generate_args", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["generate", "x"])


def test_corrupt_model_subprocess_has_no_traceback(paths) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vqdiffusion.cli", "info", paths["v"]["huge_T"]],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_prompt_bytes_that_are_not_utf8_subprocess(paths) -> None:
    """``vqdiffusion generate $'a \\xff b'``: the raw argv bytes, refused before the model is read."""
    proc = subprocess.run(
        [sys.executable, "-m", "vqdiffusion.cli", "generate", b"a \xff b", "--model", paths["text"], "--quiet"],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"},
        cwd=paths["root"],
    )
    err = proc.stderr.decode("utf-8").strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: prompt 'a \\udcff b'"), err
    assert "(the byte 0xff, not valid UTF-8) at position 2" in err
    assert not list(Path(paths["root"]).glob("*.png"))


# ---------------------------------------------------------------------------------------------------------
# The same refusals in the Python API
# ---------------------------------------------------------------------------------------------------------
def _load(name: str):
    return lambda p: VQDiffusionPipeline.from_pretrained(p["v"][name])


def _call(**kwargs):
    return lambda p: VQDiffusionPipeline.from_pretrained(p["text"])("x", progress=False, **kwargs)


def _stats(name: str):
    return lambda p: ReferenceStats.load(p["f"][name])


def _gens(*seeds: int | None) -> list[torch.Generator | None]:
    return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]


def _edit(method: str, *, meta: str = "", **kwargs):
    """``pipe.<method>`` on the tiny text model with an 8x8 image (a 4x4 one for outpaint) and a mask of one
    corner; ``meta`` names the input given as a meta-device tensor."""

    def call(p):
        pipe = VQDiffusionPipeline.from_pretrained(p["text"])
        width, height = pipe.image_size
        image = torch.rand(3, height // 2, width // 2) if method == "outpaint" else torch.rand(3, height, width)
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[:2, :2] = True
        image, mask = (image.to("meta") if meta == "image" else image), (mask.to("meta") if meta == "mask" else mask)
        args = {"inpaint": (image, mask), "outpaint": (image,), "variation": (image,)}[method]
        return getattr(pipe, method)("x", *args, progress=False, **kwargs)

    return call


def _pt(name: str):
    """A ``output_type="pt"`` call on damaged model ``name`` (an image tensor, no PNG encoding)."""
    return lambda p: VQDiffusionPipeline.from_pretrained(p["v"][name])("x", progress=False, output_type="pt")


API_CASES = [
    pytest.param(_load("huge_T"), ValueError, ("timestep_embedding",), id="T-1e9"),
    pytest.param(_load("huge_codebook"), ValueError, ("num_embeddings",), id="codebook-1e10"),
    pytest.param(_load("norm_eps_1e300"), ValueError, ("norm_eps",), id="norm-eps-1e300"),
    pytest.param(_load("mlp_ratio_digits"), ValueError, ("402-digit",), id="mlp-ratio-digits"),
    pytest.param(_load("nan_weights"), ValueError, ("NaN",), id="nan-weights"),
    pytest.param(_load("int_weights"), ValueError, ("int32",), id="int-weights"),
    pytest.param(_load("defaults_steps"), ValueError, ("num_inference_steps",), id="defaults-steps"),
    pytest.param(_load("deep_config"), ValueError, ("nested too deeply",), id="deep-json"),
    pytest.param(
        lambda p: VQDiffusionPipeline.from_pretrained(p["text"], device="foo"), DeviceError, ("'foo'",), id="device"
    ),
    pytest.param(
        lambda p: VQDiffusionPipeline.from_pretrained(p["text"]).to("meta"), DeviceError, ("meta",), id="to-meta"
    ),
    pytest.param(
        lambda p: VQDiffusionPipeline.from_pretrained(p["text"], dtype=torch.int32),
        ValueError,
        ("dtype=torch.int32", "torch.float32, torch.float16, torch.bfloat16"),
        id="dtype-int32",
    ),
    pytest.param(
        lambda p: VQDiffusionPipeline.from_pretrained(p["text"], torch_dtype=torch.int32),
        ValueError,
        ("torch_dtype=torch.int32", "torch.float16"),
        id="torch-dtype-int32",
    ),
    pytest.param(
        lambda p: VQDiffusionPipeline.from_pretrained(p["text"]).to(dtype=torch.int8),
        ValueError,
        ("dtype=torch.int8", "torch.float32, torch.float16, torch.bfloat16"),
        id="to-int8",
    ),
    pytest.param(_edit("inpaint", meta="image"), ValueError, ("image", "meta device"), id="inpaint-meta-image"),
    pytest.param(_edit("inpaint", meta="mask"), ValueError, ("mask", "meta device"), id="inpaint-meta-mask"),
    pytest.param(_edit("variation", meta="image"), ValueError, ("image", "meta device"), id="variation-meta"),
    pytest.param(_edit("outpaint", meta="image"), ValueError, ("image", "meta device"), id="outpaint-meta"),
    pytest.param(_call(generator=_gens(0, 1, 2)), ValueError, ("3 generators", "1 image"), id="generators-3-for-1"),
    pytest.param(
        _call(generator=_gens(0, None), num_images_per_prompt=2),
        ValueError,
        ("generator[1] is None", "one generator per image"),
        id="generator-none",
    ),
    pytest.param(
        _edit("inpaint", generator=_gens(0, 1, 2)), ValueError, ("3 generators", "1 image"), id="inpaint-generators"
    ),
    pytest.param(_edit("outpaint", offset=(1.5, 0)), ValueError, ("offset", "integers", "1.5"), id="offset-1.5"),
    pytest.param(
        lambda p: VQDiffusionPipeline.from_pretrained(p["text"])("a \udcff", progress=False),
        ValueError,
        ("'a \\udcff'", "0xff", "position 2", "UTF-8"),
        id="prompt-lone-surrogate",
    ),
    pytest.param(
        lambda p: VQDiffusionPipeline.from_pretrained(p["text"])(["ok", "b\ud800"], progress=False),
        ValueError,
        ("prompts[1]", "position 1", "UTF-8"),
        id="prompt-list-surrogate",
    ),
    pytest.param(_pt("huge_denoiser"), ValueError, ("denoiser's log-probabilities", "NaN"), id="denoiser-x1e30"),
    pytest.param(_pt("huge_null"), ValueError, ("null condition", "guidance_scale=1"), id="null-x1e30"),
    pytest.param(_pt("huge_vqvae"), ValueError, ("VQ-VAE decoder", "NaN or infinite pixels"), id="vqvae-x1e30-pt"),
    pytest.param(_call(guidance_scale=1e30), ValueError, ("guidance_scale",), id="guidance-1e30"),
    pytest.param(_call(temperature=1e-300), ValueError, ("temperature",), id="temperature-tiny"),
    pytest.param(_call(num_images_per_prompt=10**12), ValueError, ("images need about",), id="num-images-huge"),
    pytest.param(_call(batch_size=0), ValueError, ("batch_size",), id="batch-size-0"),
    pytest.param(
        lambda p: load_checkpoint(find_latest_checkpoint(Path(p["c"]["config_list"]) / "checkpoints"), "denoiser"),
        CheckpointError,
        ("'config' is a JSON list",),
        id="checkpoint-config-list",
    ),
    pytest.param(
        lambda p: DenoiserTrainConfig(token_dir="t", output_dir="o", num_timesteps=10, sample_steps=20),
        ConfigError,
        ("sample_steps=20",),
        id="train-config-sample-steps",
    ),
    pytest.param(
        lambda p: make_dataset(Path(p["root"]) / "shapes_huge", 10**12, 0),
        ValueError,
        ("limit of 10000000",),
        id="make-dataset-huge",
    ),
    pytest.param(
        lambda p: export_pipeline(p["afile"], p["root"]), OutputExistsError, ("--overwrite",), id="export-not-empty"
    ),
    pytest.param(
        lambda p: convert_authors_checkpoint(p["f"]["authors_ckpt"], p["f"]["authors_yaml_layers_1e9"]),
        ConversionError,
        ("n_layer=1000000000",),
        id="convert-layers-1e9",
    ),
    pytest.param(_stats("npz_nan_mu"), ReferenceStatsError, ("'mu' holds NaN",), id="stats-nan-mu"),
    pytest.param(_stats("npz_negative_sigma"), ReferenceStatsError, ("negative eigenvalue",), id="stats-sigma"),
    pytest.param(_stats("npz_empty"), ReferenceStatsError, ("an empty file",), id="stats-empty"),
    pytest.param(
        lambda p: check_output_path(Path(p["afile"]) / "x.png"), OutputPathError, ("is a file",), id="out-path"
    ),
    pytest.param(
        lambda p: check_output_path(p["afile"], folder=True), NotADirectoryError, ("not a folder",), id="out-dir"
    ),
    pytest.param(
        lambda p: atomic_write_bytes("/dev/full", b"x" * 100_000),
        OSError,
        ("No space left",),
        id="dev-full",
        marks=DEV_FULL_SKIP,
    ),
]


@pytest.mark.parametrize(("call", "kind", "words"), API_CASES)
def test_api_refuses_with_a_message(paths, call, kind, words) -> None:
    with pytest.raises(kind) as info:
        call(paths)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_dev_full_stays_a_device() -> None:
    """Writing to a device never replaces it by a file (the atomic rename would)."""
    if not HAS_DEV_FULL:
        pytest.skip("no /dev/full character device")
    with pytest.raises(OSError) as info:
        atomic_write_bytes("/dev/full", b"x" * 100_000)
    assert info.value.errno == errno.ENOSPC and info.value.filename == "/dev/full"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_batches_give_the_same_images_with_one_generator_per_image(paths) -> None:
    pipe = VQDiffusionPipeline.from_pretrained(paths["text"])

    def run(**kwargs):
        gens = [torch.Generator().manual_seed(i) for i in range(6)]
        return pipe(["a", "b"], num_images_per_prompt=3, generator=gens, progress=False, output_type="tokens", **kwargs)

    assert torch.equal(run().tokens, run(batch_size=4).tokens)
    assert pipe.plan_batches(5, batch_size=2) == [(0, 2), (2, 4), (4, 5)]


# ---------------------------------------------------------------------------------------------------------
# Training runs: one per --out, SIGKILL during a checkpoint write, a full disk during a save
# ---------------------------------------------------------------------------------------------------------
TRAIN_FLAGS = TRAIN[2:] + ["--lr", "1e-3", "--lr-warmup", "1", "--log-every", "1", "--sample-every", "100000"]

_HOLD_LOCK = """
import sys, time
from vqdiffusion.training.output_dir import claim_output_dir
lock = claim_output_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""

# A training run whose second checkpoint write stops half-way (the test kills it there).
_STALL_SECOND_SAVE = """
import sys, time
from pathlib import Path
import vqdiffusion.training.checkpoint as checkpoint
real_save, calls = checkpoint.save_file, []

def stalling_save(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) < 2:
        return real_save(tensors, path, metadata=metadata)
    real_save(tensors, path, metadata=metadata)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])  # half of the file is on disk
    Path(sys.argv[1]).write_text("stalled")
    time.sleep(120)

checkpoint.save_file = stalling_save
from vqdiffusion.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    process.stderr.close()


def test_second_run_on_the_same_out_is_refused(paths, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    holder = _python(_HOLD_LOCK, str(out))
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [*_format(["train", "{tokens}", *TRAIN_FLAGS], paths, tmp_path), "--out", str(out), "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "in use by another training run" in err and f"process {holder.pid}" in err
        assert not (out / "checkpoints").exists()  # the refused run touched nothing
        with pytest.raises(OutputDirInUseError):
            claim_output_dir(out)
    finally:
        _kill(holder)
    with claim_output_dir(out):  # the kernel dropped the killed holder's lock: no stale lock
        pass


def test_sigkill_during_a_checkpoint_write_loses_nothing(paths, tmp_path, capsys) -> None:
    out, marker = tmp_path / "run", tmp_path / "stalled"
    flags = _format(TRAIN_FLAGS, paths, tmp_path)
    args = ["train", paths["tokens"], *flags, "--out", str(out), "--steps", "3", "--save-every", "1", "--quiet"]
    run = _python(_STALL_SECOND_SAVE, str(marker), *args)
    try:
        _wait_for(marker.exists, run)
    finally:
        _kill(run)
    ckpt_dir = out / "checkpoints"
    leftovers = [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and ".tmp" in leftovers[0]  # the half-written file kept its temporary name
    assert find_latest_checkpoint(ckpt_dir).name == "step_00000001.safetensors"
    _, meta = load_checkpoint(ckpt_dir / "step_00000001.safetensors")
    assert meta["step"] == 1
    # --resume continues from the last complete checkpoint and removes the leftover
    assert main(["train", paths["tokens"], *flags, "--out", str(out), "--steps", "3", "--resume", "--quiet"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000002.safetensors", "step_00000003.safetensors"]


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(paths, tmp_path, capsys, monkeypatch) -> None:
    import vqdiffusion.training.checkpoint as checkpoint

    real_save, calls = checkpoint.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) < 2:
            return real_save(tensors, path, metadata=metadata)
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "run"
    flags = _format(TRAIN_FLAGS, paths, tmp_path)
    args = ["train", paths["tokens"], *flags, "--out", str(out), "--steps", "3", "--save-every", "1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on the device while writing ") and len(err.splitlines()) == 1
    assert "step_00000002.safetensors" in err and "free some space" in err
    ckpt_dir = out / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000001.safetensors"]  # no partial file
    assert load_checkpoint(ckpt_dir / "step_00000001.safetensors")[1]["step"] == 1


def test_make_shapes_overwrite_replaces_only_its_own_files(tmp_path) -> None:
    """A data set folder is refused when not empty; ``overwrite`` replaces the earlier set (no stale image
    beyond the new ``n``) and leaves other files alone."""
    out = make_dataset(tmp_path / "s", 3, 0)
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        make_dataset(out, 2, 0)
    make_dataset(out, 2, 1, overwrite=True)
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png"]
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2
    assert (out / "notes.md").read_text() == "mine"


@pytest.mark.parametrize("redirect", ["pipe", "file"])
def test_output_dev_stdout_is_one_png(paths, tmp_path, redirect) -> None:
    """``--output /dev/stdout`` writes the PNG bytes and nothing else, piped (not seekable) or redirected to a
    file (a regular file behind /dev/stdout, never replaced)."""
    if not os.path.exists("/dev/stdout"):
        pytest.skip("no /dev/stdout")
    argv = [sys.executable, "-m", "vqdiffusion.cli", *_format(gen("--output", "/dev/stdout"), paths, tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    target = tmp_path / "redirected.png"
    with open(target, "wb") if redirect == "file" else open(os.devnull, "wb") as sink:
        stdout = sink if redirect == "file" else subprocess.PIPE
        proc = subprocess.run([*argv, "--quiet"], stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    data = target.read_bytes() if redirect == "file" else proc.stdout
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size[0] > 0
    assert data.endswith(b"IEND\xaeB`\x82")  # nothing printed after the image


def test_sample_set_resume_redoes_an_empty_png(paths, tmp_path, capsys) -> None:
    """A 0-byte (or cut) image left in a sample-set folder is sampled again on resume, not counted as done."""
    out = tmp_path / "samples"
    args = _format(ss("--num", "2", "--out", str(out)), paths, tmp_path) + ["--quiet"]
    assert main(args) == 0
    first = (out / "000000.png").read_bytes()
    (out / "000000.png").write_bytes(b"")
    (out / "000001.png").write_bytes((out / "000001.png").read_bytes()[:-12])  # cut before IEND
    assert main(args) == 0
    capsys.readouterr()
    assert (out / "000000.png").read_bytes() == first  # the same seed gives the same image
    with Image.open(out / "000001.png") as image:
        image.load()

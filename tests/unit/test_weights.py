"""Weight resolution and validation on small but real files: safetensors, torch.save'd .bin, ONNX graphs, laid out
like the published repos, served from a local folder, a real S3 API (moto on loopback) and a Hugging Face cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from instantid_core.config import ModelSources
from instantid_core.errors import WeightsError
from instantid_core.weight_checks import check_weights
from instantid_core.weights import download_all, resolve_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


def _safetensors(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    save_file({"weight": torch.randn(8, 8, generator=generator), "bias": torch.zeros(8)}, str(path))


def _onnx(path: Path) -> None:
    """y = x @ W: one node, one 16x16 initializer, so most of the file is tensor data a truncation cuts into."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [weight],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _ip_adapter(path: Path, keys: tuple[str, ...] = ("image_proj", "ip_adapter"), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.save({key: {"proj.weight": torch.randn(4, 4, generator=generator)} for key in keys}, path)


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _write_root(root: Path, *, nested_face_pack: bool = False) -> Path:
    """The ROOT layout with the published file names: sdxl/, InstantID/ControlNetModel/, ip-adapter.bin, antelopev2/."""
    sdxl = root / "sdxl"
    _json(sdxl / "model_index.json", {"_class_name": "StableDiffusionXLPipeline"})
    _json(sdxl / "scheduler" / "scheduler_config.json", {"_class_name": "EulerDiscreteScheduler"})
    for tokenizer in ("tokenizer", "tokenizer_2"):
        _json(sdxl / tokenizer / "vocab.json", {"a</w>": 0})
        (sdxl / tokenizer / "merges.txt").write_text("#version: 0.2\n")
        _json(sdxl / tokenizer / "tokenizer_config.json", {})
    for seed, (model, weights) in enumerate([("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                                             ("text_encoder", "model"), ("text_encoder_2", "model")]):
        _json(sdxl / model / "config.json", {})
        _safetensors(sdxl / model / f"{weights}.safetensors", seed)
    _json(root / "InstantID" / "ControlNetModel" / "config.json", {})
    _safetensors(root / "InstantID" / "ControlNetModel" / "diffusion_pytorch_model.safetensors", 9)
    _ip_adapter(root / "InstantID" / "ip-adapter.bin")
    face = root / "antelopev2" / ("antelopev2" if nested_face_pack else "")
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "2d106det.onnx"):
        _onnx(face / name)
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_local_root_resolves_and_validates(tmp_path: Path) -> None:
    root = _write_root(tmp_path)
    resolved = resolve_weights(ModelSources.from_root(str(root)))
    assert resolved.sdxl == root / "sdxl" and resolved.adapter == root / "InstantID" / "ip-adapter.bin"
    assert resolved.face_pack == root / "antelopev2" and resolved.lcm_lora is None
    assert set(resolved.revisions.values()) == {"local"} and resolved.downloaded_files == 0
    check_weights(root)
    check_weights(resolved)


def test_nested_antelopev2_folder_is_found_and_used(tmp_path: Path) -> None:
    root = _write_root(tmp_path, nested_face_pack=True)
    assert resolve_weights(ModelSources.from_root(str(root))).face_pack == root / "antelopev2" / "antelopev2"
    check_weights(root)


@pytest.mark.parametrize(
    "rel, message",
    [
        ("sdxl/unet/config.json", "sdxl: missing unet/config.json in {root}/sdxl"),
        ("sdxl/tokenizer_2/merges.txt", "sdxl: missing tokenizer_2/merges.txt in {root}/sdxl"),
        ("sdxl/vae/diffusion_pytorch_model.safetensors", "sdxl: missing vae/diffusion_pytorch_model.safetensors"),
        ("InstantID/ControlNetModel/config.json", "identitynet: missing config.json in {root}/InstantID/Control"),
        ("InstantID/ip-adapter.bin", "adapter: missing ip-adapter.bin in {root}/InstantID"),
        ("antelopev2/glintr100.onnx", "face_pack: missing glintr100.onnx in {root}/antelopev2"),
    ],
)
def test_missing_file_is_named(tmp_path: Path, rel: str, message: str) -> None:
    root = _write_root(tmp_path)
    (root / rel).unlink()
    with pytest.raises(WeightsError, match=re.escape(message.format(root=root))) as caught:
        resolve_weights(ModelSources.from_root(str(root)))
    assert "source:" in str(caught.value)
    with pytest.raises(WeightsError, match=re.escape(message.format(root=root))):
        check_weights(root)


@pytest.mark.parametrize(
    "rel, reason",
    [
        ("antelopev2/glintr100.onnx", "truncated or not an ONNX model"),
        ("sdxl/text_encoder_2/model.safetensors", "truncated"),
        ("InstantID/ControlNetModel/diffusion_pytorch_model.safetensors", "truncated"),
        ("InstantID/ip-adapter.bin", "corrupt or truncated"),
    ],
)
def test_truncated_file_is_reported_by_name(tmp_path: Path, rel: str, reason: str) -> None:
    root = _write_root(tmp_path)
    _truncate(root / rel)
    with pytest.raises(WeightsError, match=re.escape(f"{root / rel} is {reason}")):
        check_weights(root)


def test_ip_adapter_without_a_key_says_which(tmp_path: Path) -> None:
    root = _write_root(tmp_path)
    _ip_adapter(root / "InstantID" / "ip-adapter.bin", keys=("image_proj",))
    with pytest.raises(WeightsError, match="ip-adapter.bin has no 'ip_adapter' key") as caught:
        check_weights(root)
    assert "'image_proj'" not in str(caught.value).split("key")[0]  # names only the missing key


def _upload(client, bucket: str, root: Path, prefix: str) -> None:
    for path in _files(root):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())


def _s3_sources(bucket: str, cache: Path) -> ModelSources:
    base = f"s3://{bucket}/weights"
    return ModelSources(sdxl=f"{base}/sdxl", identitynet=f"{base}/InstantID/ControlNetModel",
                        adapter=f"{base}/InstantID/ip-adapter.bin", face_pack=f"{base}/antelopev2",
                        cache_dir=str(cache))


def test_s3_source_downloads_once_then_only_changed_files(tmp_path: Path, s3_client, s3_bucket: str) -> None:
    root = _write_root(tmp_path / "src", nested_face_pack=True)
    _upload(s3_client, s3_bucket, root, "weights")
    calls: list[str] = []
    s3_client.meta.events.register("before-parameter-build.s3", lambda event_name, **_: calls.append(event_name))
    sources = _s3_sources(s3_bucket, tmp_path / "cache")

    first = resolve_weights(sources, s3_client=s3_client)
    needed = len(_files(root)) - 1  # everything but 2d106det.onnx, which the pipeline does not load
    assert first.downloaded_files == needed
    assert sum(name.endswith("GetObject") for name in calls) == needed
    assert first.face_pack == tmp_path / "cache" / "s3" / s3_bucket / "weights" / "antelopev2" / "antelopev2"
    assert first.adapter.read_bytes() == (root / "InstantID" / "ip-adapter.bin").read_bytes()

    calls.clear()
    second = resolve_weights(sources, s3_client=s3_client)
    assert second.downloaded_files == 0 and not [name for name in calls if name.endswith("GetObject")]
    assert second.revisions == first.revisions and first.revisions["sdxl"].startswith("etag:")

    _ip_adapter(root / "InstantID" / "ip-adapter.bin", seed=1)
    _upload(s3_client, s3_bucket, root / "InstantID", "weights/InstantID")
    calls.clear()
    third = resolve_weights(sources, s3_client=s3_client)
    assert third.downloaded_files == 1 and sum(name.endswith("GetObject") for name in calls) == 1
    assert third.revisions["adapter"] != first.revisions["adapter"]
    assert third.revisions["sdxl"] == first.revisions["sdxl"]

    calls.clear()
    offline = resolve_weights(sources, offline=True, s3_client=s3_client)
    assert calls == [] and offline.revisions == third.revisions


def test_s3_source_with_a_truncated_object_names_source_and_file(tmp_path: Path, s3_client, s3_bucket: str) -> None:
    root = _write_root(tmp_path / "src")
    _truncate(root / "antelopev2" / "scrfd_10g_bnkps.onnx")
    _upload(s3_client, s3_bucket, root, "weights")
    expected = rf"scrfd_10g_bnkps.onnx is truncated.*source: s3://{s3_bucket}/weights/antelopev2"
    with pytest.raises(WeightsError, match=expected):
        resolve_weights(_s3_sources(s3_bucket, tmp_path / "cache"), s3_client=s3_client)


def test_download_all_from_s3_materialises_the_root_layout(tmp_path: Path, s3_client, s3_bucket: str) -> None:
    root = _write_root(tmp_path / "src", nested_face_pack=True)
    _upload(s3_client, s3_bucket, root, "weights")
    dest = tmp_path / "root"

    resolved = download_all(dest, _s3_sources(s3_bucket, tmp_path / "cache"), s3_client=s3_client)

    assert resolved.face_pack == dest / "antelopev2"  # flattened from the nested folder
    assert sorted(p.name for p in (dest / "antelopev2").iterdir()) == ["glintr100.onnx", "scrfd_10g_bnkps.onnx"]
    assert (dest / "sdxl" / "tokenizer_2" / "tokenizer_config.json").is_file()
    cached = tmp_path / "cache" / "s3" / s3_bucket / "weights" / "InstantID" / "ip-adapter.bin"
    assert os.path.samefile(resolved.adapter, cached)  # hard-linked from the cache, not a second copy
    check_weights(dest)
    again = download_all(dest, _s3_sources(s3_bucket, tmp_path / "cache"), s3_client=s3_client)
    assert again.downloaded_files == 0 and again.sdxl == resolved.sdxl == dest / "sdxl"


def _hf_repo(hub: Path, repo_id: str, src: Path, sha: str, refs: tuple[str, ...] = ("main",)) -> None:
    """Publish `src` into the hub cache layout: blobs/<sha256>, snapshots/<commit>/<path> -> blob, refs/<name>."""
    import hashlib

    repo = hub / f"models--{repo_id.replace('/', '--')}"
    for path in _files(src):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / sha / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        _json(repo / "refs" / ref, {})
        (repo / "refs" / ref).write_text(sha)


def test_hf_cache_resolves_offline_with_revision(tmp_path: Path) -> None:
    """HF_HOME and HF_HUB_OFFLINE are read by huggingface_hub at import: a fresh interpreter shows they are honoured."""
    src = _write_root(tmp_path / "src")
    hub = tmp_path / "hf_home" / "hub"
    main, v1 = "a" * 40, "b" * 40
    _hf_repo(hub, "acme/sdxl-base", src / "sdxl", main)
    _hf_repo(hub, "acme/instantid", src / "InstantID", main)
    _json(src / "InstantID" / "ControlNetModel" / "config.json", {"version": "v1"})
    _hf_repo(hub, "acme/instantid", src / "InstantID", v1, refs=("v1",))
    (src / "nested").mkdir()
    (src / "antelopev2").rename(src / "nested" / "antelopev2")  # like the zip: the pack inside a folder
    _hf_repo(hub, "acme/antelopev2", src / "nested", main)
    sources = ModelSources(sdxl="acme/sdxl-base", identitynet="acme/instantid/ControlNetModel@v1",
                           adapter=f"acme/instantid/ip-adapter.bin@{main}", face_pack="acme/antelopev2")
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from instantid_core.config import ModelSources
        from instantid_core.errors import WeightsError
        from instantid_core.weight_checks import check_weights
        from instantid_core.weights import download_all, resolve_weights
        sources = ModelSources.model_validate_json(sys.argv[1])
        resolved = resolve_weights(sources)
        copied = download_all(Path(sys.argv[2]), sources)
        check_weights(Path(sys.argv[2]))
        try:
            resolve_weights(sources.model_copy(update={"sdxl": "acme/not-cached"}))
            error = None
        except WeightsError as err:
            error = str(err)
        print(json.dumps({"resolved": {k: str(v) for k, v in vars(resolved).items()}, "error": error,
                          "copied_face_pack": str(copied.face_pack)}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    dest = tmp_path / "root"
    done = subprocess.run([sys.executable, "-c", script, sources.model_dump_json(), str(dest)], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    resolved = out["resolved"]
    assert resolved["identitynet"] == str(hub / "models--acme--instantid" / "snapshots" / v1 / "ControlNetModel")
    assert resolved["adapter"] == str(hub / "models--acme--instantid" / "snapshots" / main / "ip-adapter.bin")
    assert resolved["face_pack"] == str(hub / "models--acme--antelopev2" / "snapshots" / main / "antelopev2")
    assert f"'identitynet': '{v1}'" in resolved["revisions"] and f"'sdxl': '{main}'" in resolved["revisions"]
    assert resolved["downloaded_files"] == "0"
    assert json.loads((dest / "InstantID" / "ControlNetModel" / "config.json").read_text()) == {"version": "v1"}
    assert out["copied_face_pack"] == str(dest / "antelopev2")
    assert "sdxl: cannot get 'acme/not-cached' from the Hugging Face hub" in out["error"]

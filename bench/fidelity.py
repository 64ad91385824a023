"""Identity fidelity (issue 26): for a folder of face photos and a list of prompts, generate one image per pair and
report the mean face similarity to the photo (the scoring recogniser: `scoring_face_pack`, else the conditioning
pack, which flatters itself) and, with a CLIP model, the CLIP text-image score: PuLID's protocol (Face Sim, CLIP-T).

    python -m bench.fidelity --weights DIR --faces FOLDER --prompts prompts.yaml [--clip openai/clip-vit-large-patch14]
    python -m bench.fidelity --tiny [--write-results]     # the tiny preset end to end (a tiny random CLIP too)

Face Sim: cosine of the output's face embedding to the photo's, averaged over the images where the scorer found a
face (those without one are counted apart). CLIP-T: 100 x cosine of CLIP's image and prompt embeddings. Everything
runs through the product's own pipeline (`InstantIDPipeline` with scoring); on the tiny preset the weights are
random, so its numbers mean nothing about InstantID: they show that the benchmark runs. No GPU figure is made up:
the device is whatever --device names, and the table says which.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from instantid_core.config import GenerateParams, ModelSources, PipelineSettings

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"
SECTION = "## Identity fidelity (issue 26)"
DEFAULT_FACE = REPO / "instantid_core" / "data" / "astronaut.jpg"
DEFAULT_PROMPTS = ["a portrait photo, studio light", "an oil painting of a person", "a person in a snowy forest"]
TINY_NOTE = ("Tiny preset: random weights, so these numbers mean nothing about InstantID's fidelity; they show the "
             "benchmark runs end to end.")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class ClipScorer:
    """CLIP-T: 100 x cosine of CLIP's image and text embeddings (transformers' CLIPModel and its processor)."""

    def __init__(self, source: str, device: str = "cpu") -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.torch, self.device = torch, device
        self.model = CLIPModel.from_pretrained(source).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(source)

    def score(self, image: np.ndarray, prompt: str) -> float:
        inputs = self.processor(text=[prompt], images=[image], return_tensors="pt", padding=True, truncation=True)
        with self.torch.no_grad():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        image_embed = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        text_embed = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return float(100 * (image_embed * text_embed).sum())


def write_tiny_clip(root: Path, dest: Path) -> Path:
    """A random tiny CLIPModel with the tiny preset's tokenizer and a 32 px image processor: the CLIP-T path end to
    end on the tiny preset (its score is noise, like every tiny number)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(root / "sdxl" / "tokenizer")
    text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": len(tokenizer), "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(dest)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(dest)
    return dest


def load_prompts(path: Path | None) -> list[str]:
    """A YAML list (strings, or {prompt: ...} as the batch job's prompt files) or one prompt per line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    text = path.read_text()
    rows = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else [line for line in text.splitlines()
                                                                          if line.strip()]
    return [row["prompt"] if isinstance(row, dict) else str(row) for row in rows]


def face_photos(folder: Path | None) -> list[Path]:
    if folder is None:
        return [DEFAULT_FACE]
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise SystemExit(f"error: --faces {folder}: no .jpg/.png/.webp files")
    return photos


def run(pipeline, photos: list[Path], prompts: list[str], params: dict, clip: ClipScorer | None,
        seed: int) -> dict:
    """One image per (photo, prompt) pair; its identity score (and CLIP-T); the means."""
    from instantid_core.errors import NoFaceDetected

    rows = []
    for photo in photos:
        for prompt in prompts:
            started = time.perf_counter()
            try:
                result = pipeline.generate([photo.read_bytes()], GenerateParams(prompt=prompt, **params), seed=seed,
                                           face_names=[str(photo)])
            except NoFaceDetected:
                rows.append({"photo": photo.name, "prompt": prompt, "status": "no_face_in_photo"})
                continue
            score = result.identity.scores[0]
            rows.append({"photo": photo.name, "prompt": prompt, "status": "ok", "face_sim": score,
                         "clip_t": clip.score(result.images[0], prompt) if clip else None,
                         "seconds": round(time.perf_counter() - started, 3)})
    found = [r["face_sim"] for r in rows if r.get("face_sim") is not None]
    clips = [r["clip_t"] for r in rows if r.get("clip_t") is not None]
    return {"rows": rows, "pairs": len(rows), "faces_found": len(found),
            "face_sim": statistics.fmean(found) if found else None,
            "clip_t": statistics.fmean(clips) if clips else None,
            "same_model": pipeline.scorer.same_model}


def table(summary: dict, meta: dict) -> str:
    def fmt(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"### {meta['when']}, `{meta['command']}`", "",
             f"{meta['device']} ({meta['machine']}), weights: {meta['weights']}, {meta['steps']} steps at "
             f"{meta['size']}, seed {meta['seed']}; scorer: {meta['scorer']}; CLIP: {meta['clip'] or 'none'}.", ""]
    if meta["tiny"]:
        lines += [f"**{TINY_NOTE}**", ""]
    lines += ["| photos | prompts | pairs | faces found | Face Sim (mean cosine) | CLIP-T |",
              "|---|---|---|---|---|---|",
              f"| {meta['photos']} | {meta['prompts']} | {summary['pairs']} | {summary['faces_found']} | "
              f"{fmt(summary['face_sim'], 3)} | {fmt(summary['clip_t'], 2)} |", "",
              "Face Sim averages the images where the scorer found a face; CLIP-T is 100 x cosine (PuLID's "
              "protocol)." + ("" if meta["device"].startswith("cuda") else " A CPU run: no GPU figure.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="a weights folder (tiny or downloaded); its buffalo_l/ scores")
    parser.add_argument("--tiny", action="store_true", help="write the tiny preset to a temporary folder and use it")
    parser.add_argument("--faces", type=Path, help="a folder of face photos (default: the bundled astronaut)")
    parser.add_argument("--prompts", type=Path, help="a YAML list or one prompt per line (default: three)")
    parser.add_argument("--clip", help="a CLIPModel folder or hub id for CLIP-T (`tiny`: a random tiny one)")
    parser.add_argument("--scoring-face-pack", help="the scoring recogniser's pack (default: the weights' own)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024, help="square output side")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--write-results", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args(argv)
    if not args.weights and not args.tiny:
        parser.error("give --weights DIR or --tiny")

    from instantid_core.pipeline import InstantIDPipeline
    from instantid_core.tiny import ensure_tiny_preset

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.weights) if args.weights else ensure_tiny_preset(Path(scratch) / "tiny")
        tiny = args.tiny or (root / ".complete").is_file()
        overrides = {"scoring_face_pack": args.scoring_face_pack} if args.scoring_face_pack else {}
        settings = PipelineSettings(device=args.device, dtype=args.dtype)
        pipeline = InstantIDPipeline(ModelSources.from_root(str(root.resolve()), **overrides), settings, scoring=True)
        clip_source = str(write_tiny_clip(root, Path(scratch) / "clip")) if args.clip == "tiny" else args.clip
        clip = ClipScorer(clip_source, args.device) if clip_source else None
        photos, prompts = face_photos(args.faces), load_prompts(args.prompts)
        params = {"steps": args.steps, "width": args.size, "height": args.size}
        summary = run(pipeline, photos, prompts, params, clip, args.seed)
    meta = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": "python -m bench.fidelity " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": args.device, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "weights": "tiny preset" if tiny else str(args.weights), "tiny": tiny, "steps": args.steps,
            "size": f"{args.size}x{args.size}", "seed": args.seed, "clip": args.clip,
            "scorer": "the conditioning pack (same model: flatters itself)" if summary["same_model"]
            else "a recogniser of its own (scoring_face_pack)", "photos": len(photos), "prompts": len(prompts)}
    section = table(summary, meta)
    print(section)
    if tiny:
        print(TINY_NOTE, file=sys.stderr)
    if args.write_results:
        from bench.results_md import replace_section, write_raw

        stamp, raw = write_raw(RESULTS_DIR, "fidelity", {"meta": meta, **summary})
        replace_section(RESULTS_MD, SECTION, f"{SECTION}\n\n{section}\nRaw JSON: `bench/results/{raw.name}`\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

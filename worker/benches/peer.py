"""The peer benchmark: diffusers' Wan transformer and VAE (PyTorch on the CPU) on exactly the cases
of longtake's benches (`worker/benches/model.rs`, `vae.rs`: the same configurations, seeded
random weights, f32, classifier-free guidance's batch of 2 and 64 text tokens for the
transformer), and a side-by-side mode that runs both, alternately, and prints the ratios.

A bench-only tool: it needs torch and diffusers (never installed by CI, never run by it).

    python3 worker/benches/peer.py peer [FILTER]          # diffusers' timings alone
    python3 worker/benches/peer.py compare [FILTER] [--rounds N]   # longtake and diffusers, alternately
    python3 worker/benches/peer.py gpu CASE [--json FILE]  # one case of the GPU check, on cuda
    python3 worker/benches/peer.py gpu-table OURS.jsonl THEIRS.jsonl  # the GPU check's table

`gpu` times diffusers on one case of longtake's GPU check (`worker/benches/gpu.rs`: `vae` for the
480p decode, `1.3b-480p` ... `14b-720p` for a step), with the same shapes, bf16 and random
weights made on the GPU; `deploy/gpu/check.sh` runs both sides case by case.

`compare` runs from the repository root: `cargo bench -p longtake-worker --bench model
transformer` and `--bench vae`, then this script's own cases, `--rounds` times, and prints each
case's times and longtake / diffusers ratio per round with the load average it ran under (the
machines are shared: a ratio measured side by side is the figure to quote, not a time).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

# case → (how longtake's bench names it, which figure of its line: "median" ms or "best" s)
CASES = {
    "transformer_tiny": ("transformer_tiny forward", "median"),
    "transformer_mid": ("transformer_mid forward", "median"),
    "vae_tiny": ("vae_decode built-in tiny model", "best"),
    "vae_wan21": ("vae_decode real Wan2.1 dims", "best"),
}


def timed(fn, runs: int) -> tuple[float, float]:
    """One warm-up call, then `runs` timed calls: (min, median) in seconds."""
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples), statistics.median(samples)


def peer_cases(wanted: str | None) -> dict[str, float]:
    """diffusers' time for each case (the transformer's median, the VAE's best: as longtake's
    benches report them), printed as it goes."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    results = {}

    def transformer(name, latent, runs, **config):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **config,
        ).eval()
        x = torch.randn(2, 16, *latent)
        t = torch.tensor([999.0, 999.0])
        text = torch.randn(2, 64, config["text_dim"])
        with torch.no_grad():
            best, median = timed(lambda: model(x, t, text, return_dict=False), runs)
        results[name] = median
        print(f"peer {name}: min {best * 1e3:.2f} ms median {median * 1e3:.2f} ms ({runs} runs)", flush=True)

    def vae(name, latent, runs, **config):
        model = AutoencoderKLWan(z_dim=16, dim_mult=[1, 2, 4, 4], attn_scales=[],
                                 temperal_downsample=[False, True, True], **config).eval()
        z = torch.randn(1, 16, *latent)
        with torch.no_grad():
            best, _ = timed(lambda: model.decode(z, return_dict=False), runs)
        results[name] = best
        print(f"peer {name}: best {best:.3f} s ({runs} runs)", flush=True)

    def want(name):
        return wanted is None or wanted in name

    if want("transformer_tiny"):
        transformer("transformer_tiny", (21, 32, 32), 5, num_attention_heads=4, attention_head_dim=16,
                    text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2)
    if want("transformer_mid"):
        transformer("transformer_mid", (21, 16, 16), 3, num_attention_heads=8, attention_head_dim=64,
                    text_dim=512, freq_dim=256, ffn_dim=2048, num_layers=8)
    if want("vae_tiny"):
        vae("vae_tiny", (21, 32, 32), 1, base_dim=8, num_res_blocks=1)
    if want("vae_wan21"):
        vae("vae_wan21", (5, 16, 16), 1, base_dim=96, num_res_blocks=2)
    return results


# The GPU check's cases, as `worker/benches/gpu.rs` defines them: Wan2.1 1.3B and 14B transformer
# sizes on 81-frame latents (21 latent frames) at 480×832 and 720×1280, 512 text tokens.
GPU_SIZES = {
    "1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
GPU_LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}
# The smoke case of both sides (a small model on a small latent, to try the script on a CPU).
GPU_SIZES["smoke"] = dict(num_attention_heads=2, ffn_dim=64, num_layers=2)
GPU_LATENTS["smoke"] = (2, 8, 8)
# Published seconds per step, Wan2.1-14B at 480p, 81 frames, one H100 (the figures).
PUBLISHED_14B_480P = {"diffusers": 9.8, "SGLang": 6.1, "LightX2V": 5.2}


def gpu_case(case: str, json_path: str | None, device: str) -> None:
    """Times diffusers on one case of the GPU check and prints (and appends to `json_path`) the
    same fields as longtake's bench. `smoke` tries it on a small model (any device)."""
    import json

    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.set_default_dtype(torch.bfloat16)

    def sync_time(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else None

    if case == "vae":
        model = AutoencoderKLWan(z_dim=16, base_dim=96, num_res_blocks=2, dim_mult=[1, 2, 4, 4], attn_scales=[],
                                 temperal_downsample=[False, True, True]).to(dev).eval()
        sync_time(lambda: model.decode(torch.randn(1, 16, 1, 8, 8, device=dev), return_dict=False))
        z = torch.randn(1, 16, *GPU_LATENTS["480p"], device=dev)
        video, took, peak = sync_time(lambda: model.decode(z, return_dict=False)[0])
        record = dict(section="vae", case="wan2.1-480p", dtype="BF16", seconds=took, peak_bytes=peak,
                      video=list(video.shape))
        print(f"diffusers vae wan2.1-480p BF16: {took:.3f} s (peak {(peak or 0) / 2**30:.2f} GiB)", flush=True)
    else:
        size, _, resolution = case.partition("-")
        resolution = resolution or size
        config = GPU_SIZES[size]
        text_dim, text_tokens = (32, 8) if size == "smoke" else (4096, 512)
        start = time.perf_counter()
        with dev:
            model = WanTransformer3DModel(
                patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
                attention_head_dim=16 if size == "smoke" else 128, text_dim=text_dim, freq_dim=256, **config,
            ).eval()
        if cuda:
            torch.cuda.synchronize()
        built = time.perf_counter() - start
        text = torch.randn(2, text_tokens, text_dim, device=dev)
        t = torch.tensor([999.0, 999.0], device=dev)
        sync_time(lambda: model(torch.randn(2, 16, 1, 16, 16, device=dev), t, text, return_dict=False))
        x = torch.randn(2, 16, *GPU_LATENTS[resolution], device=dev)
        _, took, peak = sync_time(lambda: model(x, t, text, return_dict=False))
        f, h, w = GPU_LATENTS[resolution]
        tokens = f * (h // 2) * (w // 2)
        record = dict(section="step", case=case, layers=config["num_layers"],
                      dim=config["num_attention_heads"] * (16 if size == "smoke" else 128), tokens=tokens, seconds=took, build_seconds=built,
                      peak_bytes=peak)
        print(f"diffusers step {case}: {tokens} tokens, B=2, bf16: {took:.3f} s (weights made in {built:.1f} s; "
              f"peak {(peak or 0) / 2**30:.2f} GiB)", flush=True)
    record["torch"] = torch.__version__
    record["gpu"] = torch.cuda.get_device_name() if cuda else device
    if json_path:
        with open(json_path, "a") as out:
            out.write(json.dumps(record) + "\n")


def gpu_table(ours_path: str, theirs_path: str) -> None:
    """The GPU check's side-by-side table from both sides' JSON lines."""
    import json

    def read(path):
        rows = {}
        if os.path.exists(path):
            for line in open(path):
                row = json.loads(line)
                if row["section"] in ("step", "vae"):
                    rows[f"{row['section']} {row['case']}"] = row
        return rows

    ours, theirs = read(ours_path), read(theirs_path)
    print(f"{'case':<16} {'longtake':>10} {'peak':>10} {'diffusers':>10} {'peak':>10} {'ratio':>7}")
    for case in dict.fromkeys([*ours, *theirs]):
        a, b = ours.get(case), theirs.get(case)
        fmt = lambda r: (f"{r['seconds']:>9.3f}s", f"{(r.get('peak_bytes') or 0) / 2**30:>6.2f} GiB") if r else (
            f"{'-':>10}", f"{'-':>10}")
        ratio = f"{a['seconds'] / b['seconds']:>6.2f}x" if a and b else f"{'-':>7}"
        print(f"{case:<16} {fmt(a)[0]} {fmt(a)[1]} {fmt(b)[0]} {fmt(b)[1]} {ratio}")
    print("published, Wan2.1-14B 480p 81 frames, s/step on one H100: "
          + ", ".join(f"{k} {v}" for k, v in PUBLISHED_14B_480P.items()))


def longtake_cases(cases: list[str]) -> dict[str, float]:
    """longtake's time for each of `cases`, from its benches' output (release build)."""
    out = ""
    for bench, args in (("model", ["transformer"]), ("vae", [])):
        if not any(case.startswith(bench if bench == "vae" else "transformer") for case in cases):
            continue
        run = subprocess.run(["cargo", "bench", "-q", "-p", "longtake-worker", "--bench", bench, "--", *args],
                             capture_output=True, text=True, check=True)
        out += run.stdout
        sys.stdout.write(run.stdout)
    results = {}
    for case in cases:
        label, figure = CASES[case]
        line = next((l for l in out.splitlines() if l.startswith(label)), None)
        if line is None:
            raise SystemExit(f"longtake's bench printed no line for {label!r}")
        if figure == "median":
            results[case] = float(re.search(r"median\s+([\d.]+) ms", line).group(1)) / 1e3
        else:
            results[case] = float(re.search(r": ([\d.]+) s \(best", line).group(1))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["peer", "compare", "gpu", "gpu-table"])
    p.add_argument("filter", nargs="?", help="only the cases whose name contains it (transformer, vae, _mid, ...); "
                   "gpu: the case; gpu-table: longtake's JSON lines")
    p.add_argument("theirs", nargs="?", help="gpu-table: diffusers' JSON lines")
    p.add_argument("--json", help="gpu: append the result to this file")
    p.add_argument("--device", default="cuda", help="gpu: torch's device (cuda; cpu for the smoke case)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch's threads (longtake uses every core)")
    args = p.parse_intermixed_args()
    if args.mode == "gpu":
        gpu_case(args.filter, args.json, args.device)
        return
    if args.mode == "gpu-table":
        gpu_table(args.filter, args.theirs)
        return
    import torch
    torch.set_num_threads(args.threads)
    if args.mode == "peer":
        peer_cases(args.filter)
        return
    cases = [case for case in CASES if args.filter is None or args.filter in case]
    if not cases:
        raise SystemExit(f"no case matches {args.filter!r}: the cases are {', '.join(CASES)}")
    rows = []
    for round_ in range(1, args.rounds + 1):
        ours = longtake_cases(cases)
        load = os.getloadavg()[0]
        theirs = peer_cases(args.filter)
        rows.append((round_, load, ours, theirs))
    print(f"\n{'case':<18} {'round':>5} {'load':>5} {'longtake':>10} {'diffusers':>10} {'ratio':>7}")
    for round_, load, ours, theirs in rows:
        for case in cases:
            print(f"{case:<18} {round_:>5} {load:>5.2f} {ours[case]:>9.3f}s {theirs[case]:>9.3f}s "
                  f"{ours[case] / theirs[case]:>6.2f}x")


if __name__ == "__main__":
    main()

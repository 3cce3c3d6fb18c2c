"""The peer benchmark: diffusers' Wan transformer and VAE (PyTorch on the CPU) on exactly the cases
of longtake's benches (`worker/benches/model.rs`, `vae.rs`: the same configurations, seeded
random weights, f32, classifier-free guidance's batch of 2 and 64 text tokens for the
transformer), and a side-by-side mode that runs both, alternately, and prints the ratios.

A bench-only tool: it needs torch and diffusers (never installed by CI, never run by it).

    python3 worker/benches/peer.py peer [FILTER]          # diffusers' timings alone
    python3 worker/benches/peer.py compare [FILTER] [--rounds N]   # longtake and diffusers, alternately

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
    p.add_argument("mode", choices=["peer", "compare"])
    p.add_argument("filter", nargs="?", help="only the cases whose name contains it (transformer, vae, _mid, ...)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch's threads (longtake uses every core)")
    args = p.parse_args()
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

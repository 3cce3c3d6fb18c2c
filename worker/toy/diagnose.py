"""Does a trained toy transformer use the caption's motion words? Two measurements on the encoded
training set (`train.py encode`'s `latents.pt`), a bench tool like train.py (never in CI):

1. `words`: the flow-matching loss at several noise levels with each clip's own caption, with the
   same caption with the opposite direction (left <-> right, up <-> down), and with the empty
   caption. A model that uses the direction words does worse with the swapped caption.
2. `layout`: at noise level 0.98, the model's predicted clean latents averaged over 64 noise draws
   for `moving right` and `moving left` captions, against the average training latents of those
   captions: per latent column, how far each averaged frame is from flat. The data's average puts
   the object where straight movers start and end; a model that cannot place things by absolute
   position predicts a flat average.

    python diagnose.py words  --work /tmp/toy-work --transformer /tmp/toy-work/transformer
    python diagnose.py layout --work /tmp/toy-work --transformer /tmp/toy-work/transformer
"""

from __future__ import annotations

import argparse
import os

import torch

import train

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def swapped(caption: str) -> str | None:
    for d, o in OPPOSITE.items():
        if f"moving {d} " in caption:
            return caption.replace(f"moving {d} ", f"moving {o} ")
    return None


def load(args):
    from diffusers import WanTransformer3DModel

    data = torch.load(os.path.join(args.work, "latents.pt"))
    mean = data["mean"].view(1, -1, 1, 1, 1)
    std = data["std"].view(1, -1, 1, 1, 1)
    x0 = (data["latents"].float() - mean) / std
    tokenizer = train.build_tokenizer()
    encoder = train.build_text_encoder(len(tokenizer), args.seed)
    model = WanTransformer3DModel.from_pretrained(args.transformer).float().eval()
    embed = lambda captions: train.embed_captions(tokenizer, encoder, captions)  # noqa: E731
    return x0, data["captions"], embed, model


def predict(model, xt, sigma, context):
    out = []
    for b in range(0, len(xt), 16):
        t = torch.full((len(xt[b : b + 16]),), sigma * 1000)
        out.append(model(xt[b : b + 16], t, context[b : b + 16], return_dict=False)[0])
    return torch.cat(out)


def words(args) -> None:
    x0_all, captions, embed, model = load(args)
    picked = [i for i, c in enumerate(captions) if swapped(c)][:64]
    x0 = x0_all[picked]
    contexts = {
        "own": embed([captions[i] for i in picked]),
        "swapped": embed([swapped(captions[i]) for i in picked]),
        "empty": embed([""] * len(picked)),
    }
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sigma in (0.95, 0.8, 0.6, 0.4, 0.2):
            noise = torch.randn(x0.shape, generator=g)
            xt = (1 - sigma) * x0 + sigma * noise
            losses = {
                name: (predict(model, xt, sigma, ctx) - (noise - x0)).pow(2).mean().item()
                for name, ctx in contexts.items()
            }
            print(f"sigma {sigma}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))


def layout(args) -> None:
    x0_all, captions, embed, model = load(args)
    g = torch.Generator().manual_seed(0)
    sigma = 0.98

    def profile(x, t):  # per latent column: mean |deviation from the frame's mean|
        frame = x[:, t]
        return (frame - frame.mean(dim=(-1, -2), keepdim=True)).abs().sum(0).mean(0).tolist()

    for d in ("right", "left"):
        picked = [i for i, c in enumerate(captions) if f"moving {d} on" in c][:64]
        context = embed([captions[i] for i in picked])
        with torch.no_grad():
            noise = torch.randn((len(picked),) + x0_all.shape[1:], generator=g)
            xt = (1 - sigma) * x0_all[picked] + sigma * noise
            predicted = (xt - sigma * predict(model, xt, sigma, context)).mean(0)
        data = x0_all[[i for i, c in enumerate(captions) if f"moving {d} on" in c]].mean(0)
        last = data.shape[1] - 1
        for name, x in (("data", data), ("model", predicted)):
            print(f"moving {d}, {name}: latent frame 1 "
                  f"{[round(v, 2) for v in profile(x, 1)]}, frame {last} "
                  f"{[round(v, 2) for v in profile(x, last)]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["words", "layout"])
    p.add_argument("--work", required=True, help="train.py's --work (its latents.pt)")
    p.add_argument("--transformer", required=True, help="a saved WanTransformer3DModel directory")
    p.add_argument("--seed", type=int, default=2026, help="train.py's --seed (the text encoder's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    words(args) if args.what == "words" else layout(args)


if __name__ == "__main__":
    main()

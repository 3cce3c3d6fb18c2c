"""Trains longtake's built-in `toy` model on the procedural world of `world.py` and exports it in
the published diffusers layout. A training tool (PyTorch + diffusers on the CPU), never part of
the runtime or of CI; see README.md beside it for the commands, seeds, losses and times.

Stages (`all` runs them in this order), each reading what the previous ones left under --work
and seeded on its own, so that a stage re-run alone gives what it gave inside `all`:
  vae          the Wan VAE (AutoencoderKLWan) from a frame-wise start and a norm curriculum,
               single frames then 5-frame clips
  vae-clips    the VAE continued on 9- and 17-frame clips, object pixels weighted
  encode       the training set through the VAE encoder, and the latents' per-channel statistics
  transformer  the Wan transformer with rectified flow (flow matching), captions through a frozen
               umT5 encoder with a word-level tokenizer of the grammar
  export       model_index.json, tokenizer/, text_encoder/, transformer/, vae/, scheduler/
  vae-decoder  (not in `all`) the VAE's decoder alone (the latents stay as encoded) on 17-frame
               clips; run it after `encode` if decoded colours need it (the shipped model did not)
  sample       (not in `all`) a few captions rendered with diffusers' WanPipeline
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402

Z_DIM = 16
# The VAE learns on objects smaller than the world's (radius 6-10 px against 9-14): the shipped
# VAE was trained before the world's objects grew, and smaller objects are the harder case for
# its colours, so it stays; the transformer learns on the world as it is.
VAE_RADIUS = (6.0, 10.0)
VAE_CONFIG = dict(
    base_dim=8,
    z_dim=Z_DIM,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ---------------------------------------------------------------------------------------------
# VAE


def frame_wise_init(vae: torch.nn.Module) -> None:
    """Starts the VAE as an image autoencoder applied frame by frame: the earlier taps of every
    causal 3D convolution are zero, the temporal downsampling averages frame pairs and the
    temporal upsampling repeats frames. The Wan VAE trained from its default initialisation did
    not learn flat shapes in 15 minutes here (../shared/notes/toy-model-trial.md); from this start
    single frames train like a plain conv autoencoder, and clips then only learn the motion."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResidualBlock

    time_convs = {id(m.time_conv) for m in vae.modules() if hasattr(m, "time_conv")}
    # Every residual branch starts at zero, so the network starts as its shallow path (the
    # input and output convolutions, the resampling convolutions and the shortcuts): the usual
    # zero-initialised-residual start of deep convolutional nets, which the default lacks.
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, WanResidualBlock):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            elif isinstance(module, WanAttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, WanResample) and hasattr(module, "time_conv"):
                w = module.time_conv.weight  # (out, in, 3, 1, 1)
                w.zero_()
                module.time_conv.bias.zero_()
                c = w.shape[1]
                eye = torch.eye(c)
                if module.mode == "upsample3d":  # out = 2c: both halves copy the current frame
                    w[:c, :, 2, 0, 0] = eye
                    w[c:, :, 2, 0, 0] = eye
                else:  # downsample3d, stride 2 over [previous, x0, x1]: the mean of x0 and x1
                    w[:, :, 1, 0, 0] = eye / 2
                    w[:, :, 2, 0, 0] = eye / 2
            elif (
                isinstance(module, WanCausalConv3d)
                and module.weight.shape[2] == 3
                and id(module) not in time_convs
            ):
                module.weight[:, :, :2] = 0
                module.weight[:, :, 2] *= math.sqrt(3)


def patch_single_frame_convs() -> None:
    """A causal 3D convolution on one frame with no cache sees two zero frames before it: only its
    last temporal tap contributes. Computing that tap as a 2D convolution gives the same numbers
    about three times faster, which is what single-frame training runs on."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    original = WanCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if cache_x is None and x.shape[2] == 1 and self._padding[4] == self.kernel_size[0] - 1:
            p = self._padding
            y = F.pad(x[:, :, 0], p[:4])
            out = F.conv2d(y, self.weight[:, :, -1], self.bias, stride=self.stride[1:])
            return out.unsqueeze(2)
        return original(self, x, cache_x)

    WanCausalConv3d.forward = forward


def patch_channels_last_convs() -> None:
    """torch's CPU 3D convolutions at these channel counts run about 1.7× faster on
    channels-last tensors (measured here); the numbers are the same."""
    forward = torch.nn.Conv3d._conv_forward

    def channels_last(self, x, weight, bias):
        cl = torch.channels_last_3d
        return forward(self, x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl), bias)

    torch.nn.Conv3d._conv_forward = channels_last


NORM_EXPONENT = [1.0]


def patch_norm_curriculum() -> None:
    """Wan's RMS norm divides each pixel's channel vector by its RMS. Trained from scratch at this
    size it stalls (measured: dark backgrounds decode to the dataset's mean colour, L1 0.3 after
    300 steps, while the same network without the division reaches 0.06 in 100): the decoder only
    reads the direction of its input, and the encoder first maps dark colours to nearly parallel
    latents. So training divides by RMS**e with e ramped from 0 (no normalisation) to 1 (Wan's
    norm, what is exported and what longtake runs); every step after the ramp trains the exact
    architecture."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    original = WanRMS_norm.forward

    def forward(self, x):
        e = NORM_EXPONENT[0]
        if e >= 1.0:
            return original(self, x)
        rms = x.pow(2).mean(1, keepdim=True).add(1e-12).sqrt()
        return x / rms.pow(e) * self.gamma + self.bias

    WanRMS_norm.forward = forward


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 → (3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def clip_batch(rng: np.random.Generator, batch: int, frames: int) -> torch.Tensor:
    out = []
    for _ in range(batch):
        clip = world.sample_clip(rng, "train", radius=VAE_RADIUS)
        first = int(rng.integers(0, world.FRAMES - frames + 1))
        out.append(to_tensor(clip.render(first + frames, first)))
    return torch.stack(out)


def object_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """`weight` on pixels off the frame's background colour (its per-channel median), 1 elsewhere:
    the object covers 3-8% of a frame, and an unweighted loss is satisfied by the background."""
    bg = x.flatten(3).median(dim=3).values[..., None, None]
    off = (x - bg).abs().amax(dim=1, keepdim=True) > 0.1
    return 1.0 + (weight - 1.0) * off.float()


def vae_loss(vae, x: torch.Tensor, object_weight: float = 1.0) -> tuple[torch.Tensor, float]:
    h = vae._encode(x)
    mu = h[:, :Z_DIM]
    # decoded without the final clamp to [-1, 1], whose gradient is zero where it saturates
    vae.clear_cache()
    z = vae.post_quant_conv(mu)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(
            vae.decoder(
                z[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0
            )
        )
    vae.clear_cache()
    out = torch.cat(outs, 2)
    err = out - x
    l1 = err.abs().mean()
    w = object_weights(x, object_weight) if object_weight != 1.0 else 1.0
    loss = (w * err.abs()).mean() + (w * err.pow(2)).mean() + 1e-5 * mu.pow(2).mean()
    return loss, l1.item()


def train_vae(args) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    patch_single_frame_convs()
    patch_channels_last_convs()
    patch_norm_curriculum()
    vae = AutoencoderKLWan(**VAE_CONFIG)
    frame_wise_init(vae)
    n = args.vae_image_steps // 3
    phases = [  # (steps, batch, frames, norm exponent from, to)
        (n, 16, 1, 0.0, 0.0),
        (n, 16, 1, 0.0, 1.0),
        (args.vae_image_steps - 2 * n, 16, 1, 1.0, 1.0),
        (args.vae_clip_steps, 4, 5, 1.0, 1.0),
    ]
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    total = sum(p[0] for p in phases)
    step, start, ema = 0, time.time(), None
    for steps, batch, frames, e0, e1 in phases:
        for i in range(steps):
            NORM_EXPONENT[0] = e0 + (e1 - e0) * i / max(1, steps - 1)
            warm = min(1.0, (step + 1) / 100)
            decay = 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = args.vae_lr * warm * (0.1 + 0.9 * decay)
            loss, l1 = vae_loss(vae, clip_batch(rng, batch, frames), args.vae_object_weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            ema = l1 if ema is None else 0.98 * ema + 0.02 * l1
            step += 1
            if step % 50 == 0 or step == total:
                log(f"vae step {step}/{total} frames {frames} L1 {l1:.4f} (ema {ema:.4f}) {time.time() - start:.0f}s")
    os.makedirs(args.work, exist_ok=True)
    vae.save_pretrained(os.path.join(args.work, "vae"))
    NORM_EXPONENT[0] = 1.0
    log(f"vae trained in {time.time() - start:.0f}s")
    report_vae(vae, args.seed)


def train_vae_clips(args) -> None:
    """Continues a VAE from --work/vae on clips long enough to reach the causal cache's steady
    state (a 17-frame clip is the first frame and four 4-frame chunks), the object weighted."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed + 10)
    rng = np.random.default_rng(args.seed + 10)
    patch_single_frame_convs()
    patch_channels_last_convs()
    vae = AutoencoderKLWan.from_pretrained(os.path.join(args.work, "vae"))
    phases = [(args.vae_clip9_steps, 4, 9), (args.vae_clip17_steps, 2, 17)]
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_clip_lr, weight_decay=0.0)
    total = sum(p[0] for p in phases)
    step, start, ema = 0, time.time(), None
    for steps, batch, frames in phases:
        for _ in range(steps):
            decay = 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = args.vae_clip_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * decay)
            loss, l1 = vae_loss(vae, clip_batch(rng, batch, frames), args.vae_object_weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            ema = l1 if ema is None else 0.95 * ema + 0.05 * l1
            step += 1
            if step % 25 == 0 or step == total:
                log(f"vae clips step {step}/{total} frames {frames} L1 {l1:.4f} (ema {ema:.4f}) {time.time() - start:.0f}s")
    vae.save_pretrained(os.path.join(args.work, "vae"))
    log(f"vae clip training in {time.time() - start:.0f}s")
    report_vae(vae, args.seed)


def train_vae_decoder(args) -> None:
    """Fine-tunes the decoder alone (the encoder, hence every encoded latent, stays as it was)
    on 17-frame clips with the object weighted 10x: small objects' colours were off (an orange
    square decoded olive). It can run beside the transformer's training, which only sees
    latents."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed + 20)
    rng = np.random.default_rng(args.seed + 20)
    patch_single_frame_convs()
    patch_channels_last_convs()
    vae = AutoencoderKLWan.from_pretrained(os.path.join(args.work, "vae"))
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.vae_clip_lr, weight_decay=0.0)
    start, ema = time.time(), None
    for step in range(args.vae_decoder_steps):
        decay = 0.5 * (1 + math.cos(math.pi * step / args.vae_decoder_steps))
        for g in opt.param_groups:
            g["lr"] = args.vae_clip_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * decay)
        loss, l1 = vae_loss(vae, clip_batch(rng, 2, 17), args.vae_object_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = l1 if ema is None else 0.95 * ema + 0.05 * l1
        if (step + 1) % 25 == 0:
            log(f"vae decoder step {step + 1}/{args.vae_decoder_steps} L1 {l1:.4f} (ema {ema:.4f}) {time.time() - start:.0f}s")
    vae.save_pretrained(os.path.join(args.work, "vae"))
    log(f"vae decoder training in {time.time() - start:.0f}s")
    report_vae(vae, args.seed)


def report_vae(vae, seed: int) -> None:
    """L1 per background on 17-frame clips of another seed, the exported architecture."""
    rng = np.random.default_rng(seed + 1)
    clips = [world.sample_clip(rng, "all") for _ in range(20)]
    errs: dict[str, list[float]] = {}
    object_errs = []
    with torch.no_grad():
        for clip in clips:
            x = to_tensor(clip.render(17))[None]
            _, l1 = vae_loss(vae, x)
            errs.setdefault(clip.background, []).append(l1)
            out = vae.decode(vae._encode(x)[:, :Z_DIM]).sample
            on_object = object_weights(x, 2.0) > 1.5
            object_errs.append(((out - x).abs() * on_object).sum().item() / (3 * on_object.sum().item()))
    per = ", ".join(f"{b} {np.mean(v):.3f}" for b, v in sorted(errs.items()))
    log(f"vae 17-frame L1 on 20 clips of seed {seed + 1}: {np.mean(sum(errs.values(), [])):.4f} ({per}); "
        f"on object pixels {np.mean(object_errs):.3f}")


# ---------------------------------------------------------------------------------------------
# Text: a word-level tokenizer of the grammar and a frozen, seeded umT5 encoder

MAX_SEQUENCE_LENGTH = 16  # the longest caption is 10 words + </s>
TEXT_CONFIG = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
    layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=True,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
TRANSFORMER_CONFIG = dict(
    patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=32, in_channels=Z_DIM,
    out_channels=Z_DIM, text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
FLOW_SHIFT = 3.0


def build_tokenizer():
    """<pad> 0, </s> 1, <unk> 2, then the grammar's words: exact ids for every caption, and an
    unknown word is <unk>, not a crash."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in world.vocabulary():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def build_text_encoder(vocab_size: int, seed: int):
    """Frozen and seeded: the captions' words only need to be told apart, which random
    embeddings do, and a frozen encoder cannot memorise whole captions, which matters for the
    held-out combinations; the transformer's text projection and cross-attention learn to read it."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TEXT_CONFIG)).eval()
    return model


def embed_captions(tokenizer, encoder, captions: list[str]) -> torch.Tensor:
    """What WanPipeline gives its transformer: embeddings of the real tokens, zero-padded to
    MAX_SEQUENCE_LENGTH."""
    t = tokenizer(captions, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                  add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        h = encoder(t.input_ids, t.attention_mask).last_hidden_state
    return h * t.attention_mask[..., None]


# ---------------------------------------------------------------------------------------------
# Encoding the training set


def load_vae(args):
    from diffusers import AutoencoderKLWan

    patch_single_frame_convs()
    patch_channels_last_convs()
    return AutoencoderKLWan.from_pretrained(os.path.join(args.work, "vae")).eval()


def encode_dataset(args) -> None:
    vae = load_vae(args)
    clips = world.dataset(args.data_seed, args.clips, "train", args.frames, args.wrap)
    latents = []
    start = time.time()
    with torch.no_grad():
        for i in range(0, len(clips), 8):
            x = torch.stack([to_tensor(c.render(args.frames)) for c in clips[i : i + 8]])
            latents.append(vae._encode(x)[:, :Z_DIM].half())
            if (i // 8) % 10 == 0:
                log(f"encoded {i + len(latents[-1])}/{len(clips)} {time.time() - start:.0f}s")
    z = torch.cat(latents).float()
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    torch.save({"latents": z.half(), "captions": [c.caption for c in clips], "mean": mean, "std": std},
               os.path.join(args.work, "latents.pt"))
    log(f"encoded {len(clips)} clips (data seed {args.data_seed}) in {time.time() - start:.0f}s; "
        f"latent mean {mean.mean():.3f} std {std.mean():.3f}")


# ---------------------------------------------------------------------------------------------
# Transformer: rectified flow


def object_latent_mask(clip: world.Clip, frames: int) -> torch.Tensor:
    """1 on the latent cells (latent frames × 8 × 8) the object covers in the frames each latent
    frame encodes (frame 0 alone, then groups of 4), with a margin of one cell; 0 elsewhere."""
    centres = clip.centres(frames)
    t = (frames - 1) // 4 + 1
    cells = world.SIZE // 8
    grid = (torch.arange(cells) + 0.5) * 8
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    mask = torch.zeros(1, t, cells, cells)
    for k in range(t):
        span = [0] if k == 0 else range(4 * k - 3, 4 * k + 1)
        for f in span:
            cx, cy = centres[f]
            dx, dy = gx - cx, gy - cy
            if clip.wrap:
                dx = (dx + world.SIZE / 2) % world.SIZE - world.SIZE / 2
                dy = (dy + world.SIZE / 2) % world.SIZE - world.SIZE / 2
            near = dx.pow(2) + dy.pow(2) <= (clip.radius + 8) ** 2
            mask[0, k] = torch.maximum(mask[0, k], near.float())
    return mask


def train_transformer(args) -> None:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed)
    data = torch.load(os.path.join(args.work, "latents.pt"))
    mean = data["mean"].view(1, -1, 1, 1, 1)
    std = data["std"].view(1, -1, 1, 1, 1)
    x0_all = (data["latents"].float() - mean) / std
    tokenizer = build_tokenizer()
    encoder = build_text_encoder(len(tokenizer), args.seed)
    captions = data["captions"]
    unique = sorted(set(captions)) + [""]
    table = embed_captions(tokenizer, encoder, unique)
    index = {c: i for i, c in enumerate(unique)}
    cap_ids = torch.tensor([index[c] for c in captions])
    empty = index[""]

    weights = None
    if args.object_weight != 1.0:
        clips = world.dataset(args.data_seed, len(captions), "train", args.frames, args.wrap)
        assert [c.caption for c in clips] == captions, "--data-seed/--clips differ from encode's"
        weights = torch.stack([object_latent_mask(c, args.frames) for c in clips])
        weights = weights * (args.object_weight - 1) + 1
    first_step, trainer = 0, None
    if args.continue_run:
        saved = sorted(
            (int(d[len("transformer-step"):]), d) for d in os.listdir(args.work)
            if d.startswith("transformer-step") and os.path.exists(os.path.join(args.work, d, "trainer.pt"))
        )
        if not saved:
            raise SystemExit(f"--continue-run: no transformer-stepN/trainer.pt under {args.work}")
        first_step, latest = saved[-1]
        model = WanTransformer3DModel.from_pretrained(os.path.join(args.work, latest))
        trainer = torch.load(os.path.join(args.work, latest, "trainer.pt"))
        log(f"transformer continues the run from step {first_step} ({args.work}/{latest})")
    elif args.resume:
        model = WanTransformer3DModel.from_pretrained(os.path.join(args.work, "transformer"))
        log(f"transformer resumed from {args.work}/transformer")
    else:
        model = WanTransformer3DModel(**dict(TRANSFORMER_CONFIG, patch_size=[1, args.patch, args.patch],
                                             num_layers=args.layers))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # An exponential moving average of the weights is what gets exported (when --ema > 0): the
    # raw weights of a small model at this learning rate draw jittery objects with stray
    # fragments; their average over the last ~1/(1 - ema) steps is the usual cure.
    averaged = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else None
    g = torch.Generator().manual_seed(args.seed)
    start, ema = time.time(), None
    if trainer is not None:
        # the same run as one that never stopped: optimiser moments, batch and noise draws, loss
        # average and weight average all continue where the checkpoint left them
        opt.load_state_dict(trainer["optimizer"])
        g.set_state(trainer["generator"])
        ema = trainer["loss_ema"]
        if averaged is not None:
            averaged.load_state_dict(trainer["averaged"])
    for step in range(first_step, args.steps):
        warm = min(1.0, (step + 1) / 200)
        decay = 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * (0.05 + 0.95 * decay)
        idx = torch.randint(len(x0_all), (args.batch,), generator=g)
        x0 = x0_all[idx]
        ids = cap_ids[idx].clone()
        ids[torch.rand(args.batch, generator=g) < 0.1] = empty  # for classifier-free guidance
        context = table[ids]
        u = torch.rand(args.batch, generator=g)
        shift = args.train_shift
        sigma = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = model(xt, sigma * 1000, context, return_dict=False)[0]
        err = (pred - (noise - x0)).pow(2)
        loss = err.mean() if weights is None else (err * weights[idx]).mean() / weights[idx].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if averaged is not None:
            with torch.no_grad():
                for kept, p in zip(averaged.parameters(), model.parameters()):
                    kept.lerp_(p, 1 - args.ema)
        ema = loss.item() if ema is None else 0.99 * ema + 0.01 * loss.item()
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            out = os.path.join(args.work, f"transformer-step{step + 1}")
            model.save_pretrained(out)
            torch.save({"optimizer": opt.state_dict(), "generator": g.get_state(), "loss_ema": ema,
                        "averaged": averaged.state_dict() if averaged is not None else None},
                       os.path.join(out, "trainer.pt"))
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            log(f"transformer step {step + 1}/{args.steps} loss {loss.item():.4f} (ema {ema:.4f}) "
                f"{time.time() - start:.0f}s")
    if averaged is not None:
        model.save_pretrained(os.path.join(args.work, "transformer-raw"))
        averaged.save_pretrained(os.path.join(args.work, "transformer"))
    else:
        model.save_pretrained(os.path.join(args.work, "transformer"))
    log(f"transformer trained in {time.time() - start:.0f}s")


# ---------------------------------------------------------------------------------------------
# Export


def export(args) -> None:
    """The published diffusers layout, loadable by diffusers' WanPipeline and by longtake. The
    transformer and VAE are stored in f16 (longtake's parity holds: see README.md), the small
    text encoder in f32."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    out = args.out
    tokenizer = build_tokenizer()
    encoder = build_text_encoder(len(tokenizer), args.seed)
    data = torch.load(os.path.join(args.work, "latents.pt"))
    vae = AutoencoderKLWan.from_pretrained(os.path.join(args.work, "vae"))
    vae.register_to_config(latents_mean=[round(v, 5) for v in data["mean"].tolist()],
                           latents_std=[round(v, 5) for v in data["std"].tolist()])
    trained = f"transformer-step{args.export_step}" if args.export_step else "transformer"
    transformer = WanTransformer3DModel.from_pretrained(os.path.join(args.work, trained))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=FLOW_SHIFT)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=transformer.half(),
                       vae=vae.half(), scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    for part in ("transformer", "vae"):  # the work directory's path is nobody else's business
        config_path = os.path.join(out, part, "config.json")
        config = json.load(open(config_path))
        config["_name_or_path"] = "toy"
        json.dump(config, open(config_path, "w"), indent=2, sort_keys=True)
    index_path = os.path.join(out, "model_index.json")
    index = json.load(open(index_path))
    index["_longtake"] = {  # the defaults longtake serves this model with; diffusers ignores it
        "name": "toy", "default_width": world.SIZE, "default_height": world.SIZE,
        "default_frames": args.frames, "default_fps": world.FPS, "default_steps": args.infer_steps,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "world": "wrapping" if args.wrap else "bordered",  # the clip checker measures in it
    }
    json.dump(index, open(index_path, "w"), indent=2)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    log(f"exported to {out}: {total / 1e6:.2f} MB")


def sample(args) -> None:
    """Renders a few captions with diffusers' WanPipeline from the export (a look at what the
    model makes, independent of longtake): PNG strips of the first, middle and last frames."""
    from diffusers import WanPipeline
    from PIL import Image

    pipe = WanPipeline.from_pretrained(args.out, torch_dtype=torch.float32)
    rng = np.random.default_rng(args.seed + 2)
    os.makedirs(os.path.join(args.work, "samples"), exist_ok=True)
    for split in ("train", "held_out"):
        for i in range(args.samples):
            clip = world.sample_clip(rng, split, args.frames, wrap=args.wrap)
            g = torch.Generator().manual_seed(i)
            frames = pipe(clip.caption, negative_prompt="", height=world.SIZE, width=world.SIZE,
                          num_frames=args.frames, num_inference_steps=args.infer_steps,
                          guidance_scale=args.guidance, max_sequence_length=MAX_SEQUENCE_LENGTH,
                          generator=g, output_type="np").frames[0]
            strip = np.concatenate([frames[k] for k in (0, args.frames // 2, args.frames - 1)], 1)
            name = f"{split}-{i}-" + clip.caption.replace(" ", "_") + ".png"
            Image.fromarray((strip * 255).round().astype(np.uint8)).resize(
                (strip.shape[1] * 2, strip.shape[0] * 2), 0).save(os.path.join(args.work, "samples", name))
            log("sampled", split, clip.caption)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "vae-clips", "encode", "transformer", "vae-decoder", "export", "sample", "all"])
    p.add_argument("--work", default="toy-work", help="where stages keep what they make")
    p.add_argument("--seed", type=int, default=2026)
    # One thread: on a 2-core machine shared with anything else, torch's OpenMP threads wait on
    # each other at every barrier and two ran slower than one (measured here: 2-6 s against
    # 0.3 s for the same VAE step).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae-image-steps", type=int, default=1050)
    p.add_argument("--vae-clip-steps", type=int, default=200)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-clip9-steps", type=int, default=300)
    p.add_argument("--vae-clip17-steps", type=int, default=150)
    p.add_argument("--vae-clip-lr", type=float, default=5e-4)
    p.add_argument("--vae-object-weight", type=float, default=10.0,
                   help="loss weight of the object's pixels in every VAE stage")
    p.add_argument("--vae-decoder-steps", type=int, default=400)
    p.add_argument("--data-seed", type=int, default=7, help="the training set's world seed")
    p.add_argument("--clips", type=int, default=4000, help="training clips to encode")
    p.add_argument("--frames", type=int, default=world.FRAMES,
                   help="frames per training clip (encode, transformer) and the exported default "
                        "(the model's native window); 4k + 1")
    p.add_argument("--wrap", action="store_true",
                   help="the wrapping world (world.py): straight movers wrap around the frame")
    p.add_argument("--steps", type=int, default=20000, help="transformer steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layers", type=int, default=TRANSFORMER_CONFIG["num_layers"],
                   help="the transformer's blocks (a new run; a continued one keeps its checkpoint's)")
    p.add_argument("--patch", type=int, default=1, help="the transformer's spatial patch (latent cells)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-shift", type=float, default=FLOW_SHIFT,
                   help="the shift of the σ drawn in training (the scheduler's is FLOW_SHIFT)")
    p.add_argument("--object-weight", type=float, default=10.0,
                   help="loss weight of the latent cells the object covers")
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of the exported moving average of the transformer's weights (0: none)")
    p.add_argument("--resume", action="store_true", help="continue --work/transformer")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also save the raw weights and the trainer's state every N steps "
                        "(--work/transformer-stepN)")
    p.add_argument("--continue-run", action="store_true",
                   help="continue an interrupted run from its latest --work/transformer-stepN, on the "
                        "same schedule (same --steps, --lr and seeds as the run)")
    p.add_argument("--export-step", type=int, default=0,
                   help="export --work/transformer-stepN (a checkpoint of --checkpoint-every) instead of "
                        "--work/transformer (the run's end)")
    p.add_argument("--infer-steps", type=int, default=40, help="the exported default step count")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--samples", type=int, default=3, help="captions per split for `sample`")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "model"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.stage in ("vae", "all"):
        train_vae(args)
    if args.stage in ("vae-clips", "all"):
        train_vae_clips(args)
    if args.stage in ("encode", "all"):
        encode_dataset(args)
    if args.stage in ("transformer", "all"):
        train_transformer(args)
    if args.stage == "vae-decoder":
        train_vae_decoder(args)
    if args.stage in ("export", "all"):
        export(args)
    if args.stage == "sample":
        sample(args)


if __name__ == "__main__":
    main()

"""A1111's prompt syntax (emphasis, BREAK, prompts longer than CLIP's window): the parser against A1111's own
documented examples, the chunks, and images against diffusers given the embeddings A1111's algorithm makes (an
oracle written out here from the chunks and weights, independent of `service.images.prompts`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from service.errors import BadRequestError
from service.images import steps
from service.images.clip_text import PromptText, encode_prompts, text_states
from service.images.prompts import BREAK, Piece, check_prompt, chunk_prompt, parse_emphasis, plain_chunk, window
from service.images.tiny import build_clip_tokenizer

from .images_world import load, reference_latents
from .test_images_parity import TOL, Run, spec

W = 1 / 1.1


@pytest.mark.parametrize(
    ("prompt", "want"),
    [  # A1111's parse_prompt_attention docstring examples, then BREAK, escapes and stray brackets
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.1 * W),
                (" a ", 1.1),
                ("hill", 0.5 * 1.1),
                (", sun, ", 1.1),
                ("sky", 1.1 * 1.1 * 1.1 * 1.1),
                (".", 1.1),
            ],
        ),  # fmt: skip
        ("[a (b] c)", [("a ", W), ("b", W * 1.1), (" c", 1.1)]),  # each closer takes the last opener of its kind
        ("a) b] c\\d \\\\ e", [("a) b] cd \\ e", 1.0)]),  # closers without openers are text; a lone \ is dropped
        ("x:1.2) y", [("x:1.2) y", 1.0)]),  # a weight with no bracket open is text
        ("", [("", 1.0)]),
    ],
)
def test_emphasis_parses_as_a1111(prompt: str, want: list[tuple[str, float]]) -> None:
    got = parse_emphasis(prompt)
    assert [p.text for p in got] == [t for t, _ in want]
    assert [p.weight for p in got] == pytest.approx([w for _, w in want], rel=1e-12)


def test_break_splits_and_bad_weights_are_400s() -> None:
    assert parse_emphasis("a cat BREAK (dog:1.5)") == [Piece("a cat", 1.0), BREAK, Piece("", 1.0), Piece("dog", 1.5)]
    assert parse_emphasis("BREAKFAST") == [Piece("BREAKFAST", 1.0)]  # a word of its own only
    with pytest.raises(BadRequestError, match=r"\(text:1.2\)"):
        parse_emphasis("a (cat:1.2.3)")


@pytest.mark.parametrize(
    ("prompt", "refused"),
    [
        ("a [cat:dog:0.5] x", True), ("[dog:5]", True), ("[a|b] c", True), ("[(cat:1.2):dog:0.5]", True),
        ("a (cat:1.2.3)", True),  # prompt editing, alternation, a weight that is not a number
        ("a [b] c", False), ("\\[a:b:1\\]", False), ("[a (b:1.2) c]", False), ("[cat:dog]", False),
        ("[a:b", False), ("[a (b|c)]", False),  # emphasis and text, as A1111 reads them
    ],
)  # fmt: skip
def test_prompt_editing_and_alternation_are_400s_not_other_images(prompt: str, refused: bool) -> None:
    if refused:
        with pytest.raises(BadRequestError):
            check_prompt(prompt)
    else:
        check_prompt(prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_chunks_fill_the_window_break_and_backtrack_to_a_comma() -> None:
    tok = build_clip_tokenizer()  # window 14: every letter a token
    size = window(tok)
    assert size == 14
    long = "abcdefghij klmnopqrst uvw"
    chunks = chunk_prompt(tok, long)
    ids = _ids(tok, long)
    assert [c.ids for c in chunks] == [ids[:14], ids[14:]]  # no comma: cut at the window
    assert not any(c.weighted for c in chunks)
    # a comma 4 tokens before the window fills: the words after it move to the next chunk
    comma = tok.get_vocab()[",</w>"]
    text = "abcdefghi, klmnopqrst"
    ids = _ids(tok, text)
    cut = ids.index(comma) + 1
    chunks = chunk_prompt(tok, text)
    assert [c.ids for c in chunks] == [ids[:cut], ids[cut:]]
    # BREAK ends a chunk early; weights follow their tokens
    chunks = chunk_prompt(tok, "red cat BREAK (dog:1.5)")
    assert [c.ids for c in chunks] == [_ids(tok, "red cat"), _ids(tok, "dog")]
    assert chunks[1].weights == [1.5] * len(chunks[1].ids) and chunks[1].weighted
    assert [c.ids for c in chunk_prompt(tok, "")] == [[]]


@pytest.mark.parametrize("pad", [None, "!"])
def test_a_chunk_is_what_the_tokenizer_pads_to_its_length(pad: str | None) -> None:
    """diffusers' `tokenizer(text, padding="max_length", truncation=True)` ids, long prompts cut, for a tokenizer
    padding with its end token (CLIP-L) or another (SDXL's second, "!")."""
    from service.images.clip_text import _token_rows

    tok = build_clip_tokenizer()
    if pad is not None:
        tok.pad_token = pad
    for text in ["a red cat", "", "the cat sat on the red mat by the dog"]:
        want = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True)["input_ids"]
        ids, _ = _token_rows(tok, [plain_chunk(tok, text)], torch.device("cpu"))
        assert ids[0].tolist() == want


# ---------------------------------------------------------------------------------------------- the oracle
def _oracle(pipe: Any, chunks: list[list[tuple[str, float]]], xl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A1111's embeddings of a prompt given as its chunks of (text, weight): each chunk's tokens between the start
    and end tokens, padded; the encoder's layer diffusers takes; outputs times weights, the chunk's mean restored;
    chunks side by side; SDXL: both encoders per chunk, pooled from the first chunk's second encoder."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if xl else [])
    per_encoder, pooled = [], None
    for tok, enc in pairs:
        outs = []
        for chunk in chunks:
            ids, weights = [], []
            for text, w in chunk:
                piece = _ids(tok, text)
                ids += piece
                weights += [w] * len(piece)
            n = tok.model_max_length
            row = [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (n - len(ids) - 2)
            with torch.no_grad():
                out = enc(torch.tensor([row]), output_hidden_states=True)
            z = out.hidden_states[-2][0] if xl else out[0][0]
            if xl and pooled is None and out[0].ndim == 2:
                pooled = out[0]
            before = z.mean()
            z = z * torch.tensor([1.0, *weights] + [1.0] * (n - len(weights) - 1))[:, None]
            outs.append(z * (before / z.mean()))
        per_encoder.append(torch.cat(outs))
    return torch.cat(per_encoder, dim=-1)[None], pooled


PROMPT = "a (red:1.4) cat [on] the mat BREAK a ((dog))"
CHUNKS = [[("a ", 1.0), ("red", 1.4), (" cat ", 1.0), ("on", W), (" the mat", 1.0)], [("a ", 1.0), ("dog", 1.21)]]
NEGATIVE = "(blurry:1.3), ugly BREAK dark"
NEGATIVE_CHUNKS = [[("blurry", 1.3), (", ugly", 1.0)], [("dark", 1.0)]]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_weighted_chunked_prompts_equal_diffusers_given_a1111_embeddings(
    kind: str, sd_dir: Path, sdxl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emphasis and BREAK in prompt and negative prompt (two chunks each, 2 x 16 tokens) beside a plain row and a
    row read as diffusers reads it: each image equals the pipeline given the oracle's embeddings (or its text)."""
    xl = kind == "sdxl"
    path = sdxl_dir if xl else sd_dir
    run = Run(load(path), monkeypatch)
    weighted = replace(spec(PROMPT, 5, neg=NEGATIVE), a1111_prompts=True)
    items = [(weighted, None), (spec("a red cat", 6), None), (replace(weighted, a1111_prompts=False, seed=7), None)]
    jobs = run(items)
    ref = load(path).pipe
    cond, pooled = _oracle(ref, CHUNKS, xl)
    uncond, uncond_pooled = _oracle(ref, NEGATIVE_CHUNKS, xl)
    extra: dict[str, Any] = {}
    if xl:
        extra = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": uncond_pooled}
    extra["guidance_scale"] = 7.5  # spec's (SDXL's pipeline defaults to 5)
    want = reference_latents(ref, None, 5, prompt_embeds=cond, negative_prompt_embeds=uncond, **extra)
    torch.testing.assert_close(run.latents[jobs[0].id], want, **TOL)
    torch.testing.assert_close(
        run.latents[jobs[1].id], reference_latents(ref, "a red cat", 6, guidance_scale=7.5), **TOL
    )
    plain = reference_latents(
        ref, PROMPT, 7, negative_prompt=NEGATIVE, guidance_scale=7.5
    )  # the text as is, cut to the window
    torch.testing.assert_close(run.latents[jobs[2].id], plain, **TOL)


def test_a_long_prompt_beside_a_short_negative_is_masked_as_run_apart(sd_dir: Path) -> None:
    """Rows of different text lengths in one forward (padded, masked) give each row its own-length forward."""
    loaded = load(sd_dir)
    texts = [PromptText(PROMPT, None, a1111=True), PromptText("ugly", None, a1111=True)]
    with torch.inference_mode():
        (long, short), _ = encode_prompts(loaded, texts, xl=False)
        assert long.shape[1] == 2 * short.shape[1]
        states, mask = text_states([short, long])
        assert mask is not None and mask.tolist() == [[True] * 16 + [False] * 16, [True] * 32]
        unet, sample, t = loaded.pipe.unet, torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), 500
        together = unet(sample, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
        apart = [unet(sample[i : i + 1], t, encoder_hidden_states=h).sample for i, h in enumerate([short, long])]
        padded_unmasked = unet(sample, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(together, torch.cat(apart), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(padded_unmasked[:1], apart[0], atol=1e-4)  # the mask is what makes it equal
    assert text_states([short, short])[1] is None  # equal lengths: no mask


def test_a_long_prompt_and_a_short_negative_equal_two_forwards(sd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: an image whose prompt is two chunks and negative one equals the same image with its rows run
    apart (A1111's default for such prompts), and a plain image sharing its forwards is unchanged."""
    loaded = load(sd_dir)
    run = Run(loaded, monkeypatch)
    forwards: list[int] = []
    real = steps.denoise
    monkeypatch.setattr(
        steps, "denoise", lambda loaded, rows, fold=0: (forwards.append(len(rows)), real(loaded, rows, fold))
    )
    item = replace(spec(PROMPT, 11, neg="ugly"), a1111_prompts=True)
    jobs = run([(item, None), (spec("a red cat", 12), None)])
    assert forwards and set(forwards) == {2}  # every forward holds both images, texts of 32 and 16 tokens
    ref = load(sd_dir).pipe
    cond, _ = _oracle(ref, CHUNKS, False)
    uncond, _ = _oracle(ref, [[("ugly", 1.0)]], False)
    latents = _apart(ref, cond, uncond, seed=11)
    torch.testing.assert_close(run.latents[jobs[0].id], latents, **TOL)
    torch.testing.assert_close(run.latents[jobs[1].id], reference_latents(ref, "a red cat", 12), **TOL)


def _apart(pipe: Any, cond: torch.Tensor, uncond: torch.Tensor, seed: int, steps: int = 3) -> torch.Tensor:
    """SD's denoising loop with the prompt's and the negative's UNet forwards run separately (CFG 7.5)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    gen = torch.Generator("cpu").manual_seed(seed)
    side = 32 // pipe.vae_scale_factor
    latents = torch.randn((1, pipe.unet.config.in_channels, side, side), generator=gen) * scheduler.init_noise_sigma
    step_kwargs = pipe.prepare_extra_step_kwargs(gen, 0.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
            c = pipe.unet(x, t, encoder_hidden_states=cond).sample
            latents = scheduler.step(u + 7.5 * (c - u), t, latents, **step_kwargs).prev_sample
    return latents


def test_an_empty_a1111_negative_prompt_is_zeros_on_sdxl(sdxl_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111 zeroes an empty negative prompt's embeddings on SDXL (diffusers: an unset one, where the pipeline
    says `force_zeros_for_empty_prompt`); read as diffusers reads it, "" is encoded."""
    run = Run(load(sdxl_dir), monkeypatch)
    jobs = run(
        [(replace(spec("a red cat", 8, neg=""), a1111_prompts=True), None), (spec("a red cat", 8, neg=""), None)]
    )
    ref = load(sdxl_dir).pipe
    zeros = reference_latents(ref, "a red cat", 8, guidance_scale=7.5)
    torch.testing.assert_close(run.latents[jobs[0].id], zeros, **TOL)
    encoded = reference_latents(ref, "a red cat", 8, guidance_scale=7.5, negative_prompt="")
    torch.testing.assert_close(run.latents[jobs[1].id], encoded, **TOL)
    assert not torch.allclose(zeros, encoded, atol=1e-2)


@pytest.mark.parametrize(("long", "short", "want"), [(5, 1, [12]), (1, 1, [4]), (4, 4, [8, 8])])
def test_few_rows_of_another_text_length_join_the_larger_forward(
    long: int, short: int, want: list[int], sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images of 2-chunk and 1-chunk prompts (2 denoiser rows each): a length with fewer than 8 rows rides in the
    other's forward, padded and masked; two lengths of 8 rows or more keep a forward each. Every image is what it
    is alone."""
    run = Run(load(sd_dir), monkeypatch)
    forwards: list[int] = []
    real = steps.denoise

    def counted(loaded: Any, rows: Any, fold: int = 0) -> None:
        forwards.append(2 * len(rows))
        real(loaded, rows, fold)

    monkeypatch.setattr(steps, "denoise", counted)
    items = [(replace(spec(PROMPT, 20 + i, neg=NEGATIVE), a1111_prompts=True), None) for i in range(long)]
    items += [(spec("a red cat", 40 + i), None) for i in range(short)]
    jobs = run(items)
    assert sorted(forwards[: len(want)]) == sorted(want) and len(forwards) == len(want) * 4  # 4 forwards a image
    ref = load(sd_dir).pipe
    cond, _ = _oracle(ref, CHUNKS, False)
    uncond, _ = _oracle(ref, NEGATIVE_CHUNKS, False)
    for job, (s, _) in zip(jobs, items):
        if s.a1111_prompts:
            want_latents = reference_latents(ref, None, s.seed, prompt_embeds=cond, negative_prompt_embeds=uncond)
        else:
            want_latents = reference_latents(ref, s.prompt, s.seed)
        torch.testing.assert_close(run.latents[job.id], want_latents, **TOL)

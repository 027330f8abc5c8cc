"""Request bodies of the image routes: OpenAI's images API (plus extensions) and AUTOMATIC1111's txt2img and
img2img."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..schemas import AdapterRef, RequestBody

__all__ = [
    "A1111Request", "ImageAdapterRef", "ImageEditRequest", "ImageGenerationRequest", "Img2ImgRequest", "Txt2ImgRequest",
]  # fmt: skip


def _sampler_field(what: str) -> Any:
    return Field(None, max_length=64, description=what)


_SAMPLER = (
    'A1111\'s sampler name ("Euler a", "DPM++ 2M Karras") or a diffusers scheduler class; default: the pipeline\'s'
)
_SCHEDULE = 'A1111\'s schedule type ("karras", "exponential", "beta", "sgm_uniform", "simple"); default: automatic'


_PARTIAL = (
    "with stream: the denoiser's estimate of each finished image sent this many times part way (0-3; evenly "
    "spaced over its steps, fewer when it has too few)"
)
_CLIP_SKIP = "SD / SDXL: CLIP layers skipped from the end (diffusers' clip_skip; A1111's CLIP skip 2 is 1)"


def _guidance_rescale_field() -> Any:
    return Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="SD / SDXL with classifier-free guidance: diffusers' guidance_rescale (CFG rescale, e.g. 0.7 for "
        "v-prediction / zero-terminal-SNR models); 0 or unset: off",
    )


def _true_cfg_field() -> Any:
    return Field(
        None,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="Flux pipelines: true classifier-free guidance with negative_prompt when above 1 (diffusers' "
        "true_cfg_scale; two transformer rows per image); the guidance scale stays the distilled guidance",
    )


class ImageAdapterRef(AdapterRef):
    """An adapter of an image request: `scale` on the denoiser, `text_encoder_scale` on the text encoders (default:
    `scale`; A1111's `<lora:NAME:TE:UNET>`)."""

    text_encoder_scale: float | None = Field(None, allow_inf_nan=False, ge=-100, le=100)


class ImageGenerationRequest(RequestBody):
    """`POST /v1/images/generations`. OpenAI fields that only describe their own models (quality, style,
    background, moderation, user) are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, min_length=1, max_length=256)
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(1, ge=1, strict=True)  # the server's limits are checked in one message (`ImageFront.specs`)
    size: str | None = Field(None, max_length=16, description='"WxH", e.g. "512x512"; default: the pipeline\'s')
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100, strict=True)
    negative_prompt: str | None = Field(None, max_length=4000)
    num_inference_steps: int | None = Field(None, strict=True)  # checked with the step limit's message
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    true_cfg_scale: float | None = _true_cfg_field()
    guidance_rescale: float | None = _guidance_rescale_field()
    seed: int | None = Field(None, ge=0, le=2**62, strict=True)
    adapters: list[ImageAdapterRef] | None = Field(None, max_length=16)
    sampler: str | None = _sampler_field(_SAMPLER)
    scheduler: str | None = _sampler_field(_SCHEDULE)
    clip_skip: int | None = Field(None, ge=0, le=64, strict=True, description=_CLIP_SKIP)
    control_image: str | None = Field(
        None,
        description="a ControlNet pipeline's control image (base64 PNG / JPEG, "
        "resized to the output size as diffusers does); every image takes it",
    )
    controlnet_conditioning_scale: float = Field(
        1.0, ge=0, le=10, allow_inf_nan=False, description="the ControlNet's residuals' scale (diffusers')"
    )
    control_guidance_start: float = Field(
        0.0, ge=0, le=1, allow_inf_nan=False, description="the share of steps before the ControlNet acts (diffusers')"
    )
    control_guidance_end: float = Field(
        1.0, ge=0, le=1, allow_inf_nan=False, description="the share of the steps after which it stops (diffusers')"
    )
    stream: bool = Field(False, description="server-sent events: partial images as they come, then each image")
    partial_images: int | None = Field(None, ge=0, le=3, strict=True, description=_PARTIAL)

    @model_validator(mode="after")
    def _partial_images_stream(self) -> ImageGenerationRequest:
        if self.partial_images and not self.stream:
            raise ValueError("partial_images needs stream: true (they are sent as server-sent events)")
        return self


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of `POST /v1/images/edits` (multipart form: values arrive as text, so numbers are parsed;
    `adapters` is JSON text). The image itself is the form's `image` file, its optional `mask` (inpainting) the
    `mask` file. `strength`: the share of the schedule run from the image (diffusers' img2img `strength`)."""

    n: int = Field(1, ge=1)
    num_inference_steps: int | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    output_compression: int | None = Field(None, ge=0, le=100)
    clip_skip: int | None = Field(None, ge=0, le=64, description=_CLIP_SKIP)
    partial_images: int | None = Field(None, ge=0, le=3, description=_PARTIAL)
    strength: float = Field(0.8, ge=0, le=1, allow_inf_nan=False)

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters_from_json(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ValueError(f'adapters must be JSON text, e.g. [{{"name": "ink", "scale": 0.8}}]: {exc}') from exc


def _unset(value: Any) -> bool:
    """What A1111's clients send for a feature they do not use: false, 0, -1, "", [], {} or nothing."""
    return value is None or value is False or value in (0, -1, "") or value == [] or value == {}


# A1111 fields this server does not serve: set to anything but "unused", a 400 says so (not a silently other image)
_NOT_SERVED = {
    "restore_faces": "face restoration (GFPGAN / CodeFormer) is not served",
    "tiling": "seamless tiling is not served",
    "subseed_strength": "variation seeds (subseed, subseed_strength) are not served",
    "seed_resize_from_h": "seed resize is not served",
    "seed_resize_from_w": "seed resize is not served",
    "styles": "A1111's saved styles are not on this server: put their text in the prompt",
    "script_name": "scripts are not served",
}


class A1111Request(RequestBody):
    """What AUTOMATIC1111's txt2img and img2img bodies share. Prompt tags `<lora:NAME:WEIGHT>` select adapters."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field("", max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    steps: int = Field(20, strict=True)
    cfg_scale: float = Field(7.0, ge=0, le=100, allow_inf_nan=False)
    true_cfg_scale: float | None = _true_cfg_field()  # an extension: Flux's true CFG (cfg_scale is its guidance)
    guidance_rescale: float | None = _guidance_rescale_field()  # an extension: diffusers' CFG rescale
    seed: int = Field(-1, ge=-1, le=2**62, strict=True)
    width: int | None = Field(None, ge=1, le=16384, strict=True)
    height: int | None = Field(None, ge=1, le=16384, strict=True)
    batch_size: int = Field(1, ge=1, strict=True)
    n_iter: int = Field(1, ge=1, strict=True)
    sampler_name: str | None = _sampler_field(_SAMPLER)
    sampler_index: str | None = _sampler_field("deprecated in A1111: sampler_name when that is not given")
    scheduler: str | None = _sampler_field(_SCHEDULE)
    override_settings: dict[str, Any] | None = Field(
        None, description="per request: CLIP_stop_at_last_layers (CLIP skip) and sd_model_checkpoint (this one)"
    )
    override_settings_restore_afterwards: bool = True  # always: overrides are this request's alone
    alwayson_scripts: dict[str, Any] | None = Field(
        None, description="ControlNet's one unit on a ControlNet pipeline (module 'none': a preprocessed image); "
        "other extensions are not served"
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_is_not_served(cls, data: Any) -> Any:
        if isinstance(data, dict):
            used = [f"{key}: {why}" for key, why in _NOT_SERVED.items() if not _unset(data.get(key))]
            if used:
                raise ValueError("; ".join(used) + " (leave these out or at their defaults)")
        return data


_SAME = {"", "Use same sampler", "Use same scheduler", "Use same checkpoint"}  # what A1111's UI sends for "as pass 1"
_HIRES_NOT_SERVED = ("hr_prompt", "hr_negative_prompt", "hr_sampler_name", "hr_scheduler", "hr_checkpoint_name")


class Txt2ImgRequest(A1111Request):
    """`POST /sdapi/v1/txt2img` (AUTOMATIC1111). `enable_hr`: the hires fix, a second pass of img2img from each
    image upscaled (`hr_upscaler` Lanczos or Nearest) to `hr_scale` x or `hr_resize_x` x `hr_resize_y`."""

    enable_hr: bool = False
    hr_scale: float = Field(2.0, gt=0, le=8, allow_inf_nan=False)
    hr_upscaler: str | None = Field(None, max_length=64)
    hr_resize_x: int = Field(0, ge=0, le=16384, strict=True)
    hr_resize_y: int = Field(0, ge=0, le=16384, strict=True)
    hr_second_pass_steps: int = Field(0, ge=0, strict=True, description="0: steps")
    denoising_strength: float = Field(0.7, ge=0, le=1, allow_inf_nan=False, description="the hires pass's")

    @model_validator(mode="before")
    @classmethod
    def _refuse_other_hires_passes(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("enable_hr"):
            used = [key for key in _HIRES_NOT_SERVED if data.get(key) not in (None, *_SAME)]
            if used:
                raise ValueError(
                    f"{', '.join(used)}: a hires pass with its own prompt, sampler or checkpoint is not served; "
                    "leave them out (the pass uses the first one's)"
                )
        return data


_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


class Img2ImgRequest(A1111Request):
    """`POST /sdapi/v1/img2img` (AUTOMATIC1111): image k starts from `init_images[k % len]` (one image serves the
    whole batch; more set the batch size, as in A1111). Without width and height, the first image's size. With a
    `mask`, inpainting as diffusers' inpainting pipelines do it (`inpainting_fill` 1, "original": the masked area
    starts from the picture; `inpaint_full_res`, "only masked", is their `padding_mask_crop`)."""

    init_images: list[str] = Field(min_length=1, max_length=64, description="base64 images (data URLs allowed)")
    denoising_strength: float = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    resize_mode: int = Field(
        0, strict=True, description="0 just resize (stretched), 1 crop and resize, 2 resize and fill; 3 is not served"
    )
    mask: str | None = Field(None, description="inpainting: a base64 picture, white (or opaque) where repainted")
    mask_blur: int = Field(4, ge=0, le=64, strict=True, description="Gaussian blur radius on the mask, in pixels")
    mask_blur_x: int | None = Field(None, ge=0, le=64, strict=True, description="as mask_blur (the same value)")
    mask_blur_y: int | None = Field(None, ge=0, le=64, strict=True, description="as mask_blur (the same value)")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, strict=True, description="1: black is repainted")
    inpainting_fill: int = Field(1, ge=0, le=3, strict=True, description='1 ("original") is served')
    inpaint_full_res: bool | int = Field(
        False, description='true ("only masked"): the region around the mask inpainted at width x height, pasted back'
    )
    inpaint_full_res_padding: int = Field(0, ge=0, le=4096, strict=True, description="pixels around the mask")
    mask_round: bool = Field(True, description="true (the mask rounded to repainted or kept) is served")

    @model_validator(mode="after")
    def _inpainting_served(self) -> Img2ImgRequest:
        if self.mask is None:  # A1111 reads these only with a mask
            return self
        wrong = []
        if self.inpainting_fill != 1:
            wrong.append(f"inpainting_fill {self.inpainting_fill} ({_FILLS[self.inpainting_fill]}): the masked area "
                         "starts from the picture itself, set 1 (original)")  # fmt: skip
        if not self.mask_round:
            wrong.append("mask_round false (a soft mask): masks are rounded, as diffusers' are; set it to true")
        if {self.mask_blur_x, self.mask_blur_y} - {None, self.mask_blur}:
            wrong.append("mask_blur_x / mask_blur_y other than mask_blur: set mask_blur alone")
        if wrong:
            raise ValueError("; ".join(wrong))
        return self

"""What one server serves: the model, its workload, its limits, and the checks of every request.

A :class:`Service` is built from the ``distgen serve`` options before any worker starts (the same
validation as ``distgen generate``); it builds the resident group's job, and turns each HTTP
body into a validated workload request, raising :class:`RequestError` (an HTTP 400 with the
parameter named) before anything is queued.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distgen.config import ConfigError, ImageJob, ImageRequest, ParallelConfig, PatchConfig

WORKLOADS = ("image", "video", "text")


class RequestError(ValueError):
    """A bad request parameter (HTTP 400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_parameter"):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class ServeOptions:
    """``distgen serve`` options that shape the group and the limits (validated by Service)."""

    model: str | None = None
    workload: str | None = None  # None: from the model directory
    served_model_name: str | None = None
    parallel: str = ""
    nproc: int | None = None
    dtype: str = "fp32"
    patch_mode: str = "displaced"
    sp_mode: str = "ulysses"
    warmup_steps: int = 4
    pcpp_fraction: float = 0.3
    pipefusion_patches: int | None = None  # image, with a pipefusion axis
    vae_parallel: bool = False  # image: decode over the patch ranks
    clip_mode: str = "dual-scope"
    stale_context: bool = False
    ladder_layers: int | None = None
    comm_timeout: float = 300.0
    max_batch_size: int = 8
    # text: continuous (iteration-level) batching on a slot cache, or request-level
    batching: str = "continuous"
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    max_pixels: int = 2048 * 2048
    max_steps: int = 200
    max_frames: int = 1024
    max_prompt_chars: int = 16384
    output_dir: str | None = None
    extra: dict = field(default_factory=dict)


def detect_workload(model_dir: str) -> str:
    """image or video for a diffusers pipeline directory (by its denoiser), text for a causal LM."""
    root = Path(model_dir)
    if (root / "model_index.json").is_file():
        from distgen.models.video import VIDEO_DENOISERS

        index = json.loads((root / "model_index.json").read_text())
        classes = {v[1] for v in index.values() if isinstance(v, list) and len(v) == 2 and v[1]}
        return "video" if classes & set(VIDEO_DENOISERS) else "image"
    if (root / "config.json").is_file():
        return "text"
    raise ConfigError(f"--model {model_dir}: neither a diffusers pipeline directory (model_index.json) nor a "
                      f"causal-LM checkpoint (config.json)")


def resolve_model_for_serving(options: ServeOptions) -> tuple[str, str, str, object]:
    """(directory, workload, served name): a directory (its workload read from it unless
    --workload says), or an embedded model's name (distgen.models.presets), default SmolLM2."""
    from distgen.models import presets

    name, workload = options.model, options.workload
    if workload is not None and workload not in WORKLOADS:
        raise ConfigError(f"--workload: unknown workload {workload!r}; allowed: {', '.join(WORKLOADS)}")
    if name is not None and os.path.exists(name):
        kind = workload or detect_workload(name)
        return name, kind, options.served_model_name or Path(name).resolve().name, None
    if name is None:
        workload = workload or "text"
        name = presets.names(workload)[0]
    kinds = [workload] if workload else [w for w in WORKLOADS if name in presets.names(w)]
    if not kinds:
        every = sorted({n for w in WORKLOADS for n in presets.names(w)})
        raise ConfigError(f"--model {name}: does not exist, and is not the name of an embedded model; give a model "
                          f"directory or one of: {', '.join(every)}")
    resolved = presets.resolve(kinds[0], name, default=presets.names(kinds[0])[0])
    return resolved.directory, kinds[0], options.served_model_name or name, resolved.size


class Service:
    """One model behind the server: checks requests and builds the group's job."""

    def __init__(self, options: ServeOptions, nproc: int):
        self.options = options
        # preset_size: an embedded model's default size (image side, or video (frames, height, width))
        self.model_dir, self.workload, self.name, self.preset_size = resolve_model_for_serving(options)
        self.parallel = ParallelConfig.parse(options.parallel)
        self.nproc = nproc
        if options.max_batch_size < 1:
            raise ConfigError(f"--max-batch-size must be >= 1, got {options.max_batch_size}")
        self.output_dir = options.output_dir
        self.continuous = None  # text: the slot cache's limits (ContinuousConfig) when batching continuously
        getattr(self, f"_init_{self.workload}")()

    # ------------------------------------------------------------------ group job

    def _init_image(self) -> None:
        from distgen.config import IMAGE_AXES
        from distgen.models import diffusion as adapter
        from distgen.parallel import cfg, pipefusion, sequence

        self.parallel.validate(self.nproc, IMAGE_AXES)
        self.info = adapter.inspect_pipeline(self.model_dir)
        probe = ImageRequest(height=self.default_size[1], width=self.default_size[0])
        self.base = ImageJob(request=probe, parallel=self.parallel,
                             patch=PatchConfig(self.options.patch_mode, self.options.warmup_steps,
                                               self.options.pcpp_fraction),
                             sp_mode=self.options.sp_mode, model=self.model_dir, dtype=self.options.dtype,
                             comm_timeout_s=self.options.comm_timeout, progress=False,
                             pipefusion_patches=self.options.pipefusion_patches,
                             vae_parallel=self.options.vae_parallel)
        self.base.validate()
        adapter.validate_geometry(self.info, probe, self.parallel)
        sequence.validate_image(self.info, probe, self.parallel, self.base.sp_mode)
        cfg.validate_model(self.info, self.parallel)  # Flux: each request is checked for true CFG
        pipefusion.validate_image(self.info, probe, self.parallel, self.options.pipefusion_patches)

    def _init_video(self) -> None:
        from distgen.config_video import VIDEO_AXES, ClipConfig, VideoJob, VideoRequest
        from distgen.models import video as adapter
        from distgen.workloads.video import validate_video

        self.parallel.validate(self.nproc, VIDEO_AXES)
        self.info = adapter.inspect_video_pipeline(self.model_dir)
        self.clip = ClipConfig(mode=self.options.clip_mode, stale_context=self.options.stale_context)
        self.clip.validate()
        frames, height, width = self._video_defaults()
        probe = VideoRequest(frames=frames, height=height, width=width)
        self.base = VideoJob(request=probe, parallel=self.parallel, clip=self.clip, sp_mode=self.options.sp_mode,
                             model=self.model_dir, dtype=self.options.dtype, comm_timeout_s=self.options.comm_timeout,
                             progress=False)
        self.base.validate()
        # the group keeps the clip options as given: windows are resolved per request (per video length)
        validate_video(self.info, probe, self.parallel, self.clip, self.base.sp_mode)
        if self.output_dir is None:
            import tempfile

            self.output_dir = tempfile.mkdtemp(prefix="distgen-videos-")
        os.makedirs(self.output_dir, exist_ok=True)

    def _init_text(self) -> None:
        from distgen.models.checkpoint import load_tokenizer, open_checkpoint
        from distgen.runtime.text import TextJob, check_job

        if self.parallel.degree("dp") > 1:
            raise ConfigError("--parallel: dp is not served yet (each dp rank decodes its own share of one batch); "
                              "serve tp / pp / ep, and run one server per replica")
        self.checkpoint = open_checkpoint(self.model_dir)
        self.tokenizer = load_tokenizer(self.checkpoint.directory)
        eos = set(self.checkpoint.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos = tuple(sorted(eos))
        self.pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (min(eos) if eos else 0))
        self.context = self.checkpoint.config.max_position_embeddings
        self.base = TextJob(requests=(), parallel=self.parallel, model=self.checkpoint.directory,
                            dtype=self.options.dtype, ladder_layers=self.options.ladder_layers,
                            comm_timeout_s=self.options.comm_timeout)
        check_job(self.base, self.checkpoint, self.nproc)
        from distgen.runtime.continuous import BATCHING_MODES, ContinuousConfig

        self.continuous = None
        if self.options.batching not in BATCHING_MODES:
            raise ConfigError(f"--batching: unknown mode {self.options.batching!r}; allowed: {', '.join(BATCHING_MODES)}")
        if self.options.batching == "continuous":
            self.continuous = ContinuousConfig(self.options.max_num_seqs, self.options.max_num_batched_tokens,
                                               self.options.max_model_len).validate(self.context)
            self.context = self.continuous.max_model_len  # a request must fit in one slot

    def resident_job(self):
        from distgen.runtime.resident import ResidentJob

        return ResidentJob(workload=self.workload, base=self.base, max_batch_size=self.options.max_batch_size,
                           continuous=self.continuous)

    # ------------------------------------------------------------------ shared checks

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) of an image request without ``size``: the embedded model's, else the
        denoiser's sample size times the VAE factor (what the pipeline itself defaults to)."""
        if isinstance(self.preset_size, int):
            return self.preset_size, self.preset_size
        info = self.info
        try:
            config = json.loads((Path(info.path) / info.denoiser_attr / "config.json").read_text())
            sample = config.get("sample_size")
            side = int(sample[0] if isinstance(sample, (list, tuple)) else sample) * info.vae_scale_factor
        except (OSError, ValueError, TypeError):
            side = 512
        return side, side

    def _video_defaults(self) -> tuple[int, int, int]:
        return tuple(self.preset_size) if self.preset_size else self.info.default_size

    def check_model(self, model: str | None, required: bool = True) -> None:
        if model is None:
            if required:
                raise RequestError("you must provide a model parameter", param="model")
            return
        if model != self.name:
            raise RequestError(f"the model {model!r} does not exist; this server serves {self.name!r}",
                               param="model", status=404, code="model_not_found")

    def _check_prompt(self, prompt: str, param: str = "prompt") -> None:
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(f"{param} must be a non-empty string", param=param)
        if len(prompt) > self.options.max_prompt_chars:
            raise RequestError(f"{param} is {len(prompt)} characters; at most {self.options.max_prompt_chars} are "
                               f"accepted (--max-prompt-chars)", param=param)

    def _check_steps(self, steps: int) -> None:
        if not 1 <= steps <= self.options.max_steps:
            raise RequestError(f"steps must be between 1 and {self.options.max_steps} (--max-steps), got {steps}",
                               param="steps")

    @staticmethod
    def parse_size(size: str | None, default: tuple[int, int]) -> tuple[int, int]:
        if size is None or size == "auto":
            return default
        try:
            width, height = (int(x) for x in str(size).lower().split("x"))
        except ValueError:
            raise RequestError(f"size must be 'WIDTHxHEIGHT' (e.g. '256x256'), got {size!r}", param="size") from None
        if width < 1 or height < 1:
            raise RequestError(f"size must be positive, got {size!r}", param="size")
        return width, height

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.options.max_pixels:
            raise RequestError(f"size {width}x{height} is larger than this server allows ({self.options.max_pixels} "
                               f"pixels, --max-pixels)", param="size")

    # ------------------------------------------------------------------ images

    def image_requests(self, body: dict) -> list[ImageRequest]:
        from distgen.models import diffusion as adapter
        from distgen.parallel import cfg, pipefusion, sequence

        if self.workload != "image":
            raise RequestError(f"this server serves a {self.workload} model; images need an image model",
                               param="model", status=404, code="model_not_found")
        self.check_model(body.get("model"), required=False)
        self._check_prompt(body.get("prompt"))
        n = body.get("n") or 1
        if not 1 <= n <= self.options.max_batch_size:
            raise RequestError(f"n must be between 1 and {self.options.max_batch_size} (--max-batch-size), got {n}",
                               param="n")
        fmt = body.get("response_format") or "b64_json"
        if fmt != "b64_json":
            raise RequestError(f"response_format must be 'b64_json' (this server returns images inline), got {fmt!r}",
                               param="response_format")
        width, height = self.parse_size(body.get("size"), self.default_size)
        self._check_pixels(width, height)
        steps = body.get("steps") or 20
        self._check_steps(steps)
        self._check_mode(body, "patch_mode", self.options.patch_mode, self.parallel.degree("patch") > 1)
        self._check_mode(body, "sp_mode", self.options.sp_mode, self.parallel.degree("sp") > 1)
        guidance = body.get("guidance_scale")
        guidance = 5.0 if guidance is None else float(guidance)
        if self.parallel.degree("cfg") == 2 and guidance <= 1.0:
            raise RequestError(f"guidance_scale {guidance}: this server splits classifier-free guidance over 2 ranks "
                               "(cfg=2), which needs a scale > 1", param="guidance_scale")
        seed = body.get("seed")
        seed = 0 if seed is None else int(seed)
        negative = body.get("negative_prompt") or ""
        requests = []
        for i in range(n):
            request = ImageRequest(prompt=body["prompt"], negative_prompt=negative, height=height, width=width,
                                   steps=steps, guidance_scale=guidance, seed=seed + i)
            try:
                request.validate()
                adapter.validate_geometry(self.info, request, self.parallel)
                sequence.validate_image(self.info, request, self.parallel, self.options.sp_mode)
                cfg.validate_image(self.info, request, self.parallel)
                pipefusion.validate_image(self.info, request, self.parallel, self.options.pipefusion_patches)
            except ConfigError as exc:
                raise RequestError(_as_body_param(str(exc)), param="size" if "height" in str(exc) or "width" in str(exc)
                                   else None) from None
            requests.append(request)
        return requests

    def _check_mode(self, body: dict, key: str, current: str, active: bool) -> None:
        wanted = body.get(key)
        if wanted is not None and wanted != current:
            note = f"this server runs {key} {current!r} (set when it started)" if active else \
                f"this server's plan ({self.parallel}) does not use {key}"
            raise RequestError(f"{key} {wanted!r}: {note}", param=key)

    # ------------------------------------------------------------------ video

    def video_request(self, body: dict):
        from distgen.config_video import VideoRequest
        from distgen.workloads.video import validate_video

        if self.workload != "video":
            raise RequestError(f"this server serves a {self.workload} model; videos need a video model",
                               param="model", status=404, code="model_not_found")
        self.check_model(body.get("model"), required=False)
        self._check_prompt(body.get("prompt"))
        frames0, height0, width0 = self._video_defaults()
        width, height = self.parse_size(body.get("size"), (width0, height0))
        self._check_pixels(width, height)
        frames = body.get("frames") or frames0
        if not 1 <= frames <= self.options.max_frames:
            raise RequestError(f"frames must be between 1 and {self.options.max_frames} (--max-frames), got {frames}",
                               param="frames")
        steps = body.get("steps") or 20
        self._check_steps(steps)
        self._check_mode(body, "clip_mode", self.options.clip_mode, self.parallel.degree("clip") > 1)
        guidance = body.get("guidance_scale")
        request = VideoRequest(prompt=body["prompt"], negative_prompt=body.get("negative_prompt") or "",
                               frames=frames, height=height, width=width, steps=steps,
                               guidance_scale=7.5 if guidance is None else float(guidance),
                               seed=int(body.get("seed") or 0), fps=int(body.get("fps") or 8))
        try:
            request.validate()
            validate_video(self.info, request, self.parallel, self.clip, self.options.sp_mode)
        except ConfigError as exc:
            raise RequestError(_as_body_param(str(exc))) from None
        return request

    # ------------------------------------------------------------------ text

    def chat_prompt_ids(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer") \
                    or not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}] must be an object with role system|user|assistant and a string "
                                   f"content", param=f"messages[{i}]")
            self._check_prompt(m["content"], param=f"messages[{i}].content")
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                    for m in messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def completion_prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise RequestError("prompt must be a string (a list of one string is accepted)", param="prompt")
            prompt = prompt[0]
        self._check_prompt(prompt)
        return list(self.tokenizer(prompt)["input_ids"])

    def text_request(self, body: dict, prompt_ids: list[int]):
        from distgen.runtime.text import TextRequest

        if self.workload != "text":
            raise RequestError(f"this server serves a {self.workload} model; text needs a language model",
                               param="model", status=404, code="model_not_found")
        n = body.get("n") or 1
        most = self.continuous.max_num_seqs if self.continuous is not None else self.options.max_batch_size
        if not 1 <= n <= most:
            raise RequestError(f"n must be between 1 and {most}, got {n}", param="n")
        room = self.context - len(prompt_ids)
        if room < 1:
            raise RequestError(f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.context} "
                               f"tokens{self._context_note}", param="messages" if "messages" in body else "prompt")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        max_tokens = min(256, room) if max_tokens is None else max_tokens
        if max_tokens < 1 or max_tokens > room:
            raise RequestError(f"max_tokens {max_tokens}: the {len(prompt_ids)}-token prompt leaves room for at most "
                               f"{room} new tokens in this model's context of {self.context}{self._context_note}",
                               param="max_tokens")
        temperature = body.get("temperature")
        temperature = 1.0 if temperature is None else float(temperature)
        if not 0.0 <= temperature <= 2.0:
            raise RequestError(f"temperature must be between 0 and 2, got {temperature}", param="temperature")
        top_p = body.get("top_p")
        top_p = 1.0 if top_p is None else float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
        seed = body.get("seed")
        return TextRequest(prompt_ids=(tuple(prompt_ids),) * n, max_new_tokens=int(max_tokens),
                           temperature=temperature, top_p=top_p, seed=0 if seed is None else int(seed),
                           eos_token_ids=() if body.get("ignore_eos") else self.eos, pad_token_id=self.pad)

    @property
    def _context_note(self) -> str:
        return " (the server's --max-model-len)" if self.continuous is not None else ""

    def stop_strings(self, body: dict) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise RequestError("stop must be a non-empty string or a list of up to 4 of them", param="stop")
        return stops


def _as_body_param(message: str) -> str:
    """The CLI's messages name flags (--height); over HTTP the same limit is a body field."""
    for flag, field_name in (("--height", "size (height)"), ("--width", "size (width)"), ("--frames", "frames"),
                             ("--steps", "steps"), ("--prompt", "prompt"), ("--guidance-scale", "guidance_scale"),
                             ("--max-new-tokens", "max_tokens"), ("--fps", "fps")):
        message = message.replace(flag, field_name)
    return message

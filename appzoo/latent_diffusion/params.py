"""The user_defined_parameters of the latent_diffusion app, each declared once (name, type, default, help, modes).

The CLI parser, ``easynlp --app_name=latent_diffusion --help`` and validation all read this table. It must stay
importable without torch so that ``--help`` is instant.
"""

from __future__ import annotations

from easynlp_ldm.args import Param

TRAIN = frozenset({"train"})
GENERATE = frozenset({"predict", "serve"})
SAMPLING = frozenset({"predict", "serve", "evaluate"})
PREDICT = frozenset({"predict"})
EVALUATE = frozenset({"evaluate"})
READ_ROWS = frozenset({"train", "evaluate", "predict"})
SERVE = frozenset({"serve"})
EXPORT = frozenset({"export"})


def _positive(value):
    return None if value > 0 else "must be positive"


def _non_negative(value):
    return None if value >= 0 else "must be zero or positive"


def _unit(value):
    return None if 0 <= value <= 1 else "must be within [0, 1]"


def _multiple_of_8(value):
    return None if value >= 0 and value % 8 == 0 else "must be a multiple of 8 (0: the model's native size)"


PARAMS: tuple[Param, ...] = (
    # Model.
    Param("pretrain_model_name_or_path", str, "",
          "model to start from: a local folder (diffusers layout or this toolkit's checkpoint), an embedded "
          "model's name, or a Hugging Face / ModelScope cache entry on disk (default: the embedded default model)",
          modes=TRAIN),
    Param("overwrite_checkpoint_dir", bool, False,
          "start a new run from the pretrained model in a --checkpoint_dir that already holds a training run (its "
          "files are replaced as the new run saves); without it such a folder is an error unless "
          "--resume_from_checkpoint names it", modes=TRAIN),
    Param("reset_model_state_flag", bool, False,
          "EasyNLP's trainer saved the fine-tuned weights without its wrapper's 'model.' key prefix with it, so they "
          "load as a pretrained model again; checkpoints here always load in every mode. To start over in a folder "
          "that holds a run, use overwrite_checkpoint_dir", modes=frozenset()),
    Param("skip_bad_rows", bool, False, "skip rows that cannot be used (counted per reason and reported) instead "
          "of stopping at the first one", modes=READ_ROWS),
    # Training recipe.
    Param("train_target", str, "unet", "what to train: unet (the diffusion model; the usual fine-tuning), vae "
          "(the autoencoder, reconstruction + KL), vae_decoder (only the decoder: the latent space and the diffusion "
          "model stay valid, e.g. to teach it a new shape's details before fine-tuning the UNet), rrdb (the ESRGAN ×4 "
          "super-resolution net, on the table's images as high-resolution targets), lora (a LoRA adapter of the "
          "UNet — and of the text encoder with lora_text_encoder — on peft as diffusers does; the model stays frozen "
          "and the checkpoint is pytorch_lora_weights.safetensors in diffusers' format), controlnet (a ControlNet "
          "for the model, from its UNet as diffusers' train_controlnet.py does, on the table's conditioning-image "
          "column 'control'; the checkpoint is a diffusers ControlNetModel folder for controlnet=); for Z-Image and "
          "Qwen-Image: transformer (the whole transformer, flow matching; the checkpoint is a diffusers folder) or "
          "lora (of the transformer's attention)", modes=TRAIN,
          choices=("unet", "transformer", "vae", "vae_decoder", "rrdb", "lora", "controlnet")),
    Param("lora_rank", int, 4, "LoRA rank (train_target=lora)", modes=TRAIN, check=_positive),
    Param("lora_alpha", float, 0.0, "LoRA alpha: the update is scaled by alpha / rank (0: alpha = rank, scale 1, "
          "as diffusers' script)", modes=TRAIN, check=_non_negative),
    Param("lora_dropout", float, 0.0, "dropout on the LoRA path during training", modes=TRAIN, check=_unit),
    Param("lora_target_modules", str, "attention", "UNet modules that get a LoRA, separated by commas: attention "
          "(to_q, to_k, to_v, to_out.0, as diffusers' script), ff (the feed-forward: ff.net.0.proj, ff.net.2), or "
          "module names", modes=TRAIN),
    Param("lora_text_encoder", bool, False, "also train a LoRA of the text encoder's attention (q/k/v/out_proj)",
          modes=TRAIN),
    Param("base_precision", str, "fp32", "the frozen weights of a LoRA run (train_target=lora: the denoiser, text "
          "encoder and VAE the adapter trains against) or of an SD-1.x ControlNet run (train_target=controlnet: the "
          "UNet, text encoder and VAE; the ControlNet trained and saved in fp32): fp32, or bf16 (half their memory; "
          "loaded in bf16, the cached "
          "latents and text embeddings encoded by them, the adapter itself trained and saved in fp32, as diffusers' "
          "LoRA scripts with weight_dtype); int8, fp8 or nf4: as bf16, and the denoiser's linear weights quantised "
          "weight-only with torchao (1, 1 and about 0.5 bytes each; computed in bf16)", modes=TRAIN,
          choices=("fp32", "bf16", "int8", "fp8", "nf4")),
    Param("vae_kl_weight", float, 1e-6, "KL weight of the VAE loss (train_target=vae)", modes=TRAIN,
          check=_non_negative),
    Param("rrdb_nf", int, 0, "RRDB channels when the model has no super-resolution net yet (train_target=rrdb); "
          "0: EasyNLP's 64 for an EasyNLP-format model (its ESRGAN loads exactly 64/23/32, and the net is trained "
          "on BGR as EasyNLP feeds it), else 32 (a net for this toolkit's do_sr, on RGB)", modes=TRAIN,
          check=_non_negative),
    Param("rrdb_nb", int, 0, "RRDB blocks for a new super-resolution net; 0: 23 for an EasyNLP-format model, else 3",
          modes=TRAIN, check=_non_negative),
    Param("rrdb_gc", int, 0, "RRDB growth channels for a new super-resolution net; 0: 32 for an EasyNLP-format "
          "model, else 16", modes=TRAIN, check=_non_negative),
    Param("sr_patch", int, 128, "high-resolution crop size for train_target=rrdb (a multiple of 4)", modes=TRAIN,
          check=lambda v: None if v > 0 and v % 4 == 0 else "must be a positive multiple of 4"),
    Param("resolution", int, 0, "training image size (0: the model's native size): the side of the square, and "
          "the area of the aspect-ratio buckets (EasyNLP's text-to-image key: size). With train_target=unet the saved "
          "model's native size becomes it, so predict generates at that size", modes=TRAIN, aliases=("size",),
          check=_multiple_of_8),
    Param("text_len", int, 0, "EasyNLP's text length in tokens: when given, training tokenises captions to it "
          "instead of --sequence_length (clamped to the text encoder's positions); 0: --sequence_length",
          modes=TRAIN, check=_non_negative),
    Param("img_len", int, 256, "EasyNLP's number of image tokens of its VQGAN text-to-image app; latent diffusion "
          "has no image tokens (the image size is resolution/size)", modes=frozenset(), check=_non_negative),
    Param("do_eval", bool, True, "validate on the second table of --tables (EasyNLP's key; False: no validation, the "
          "second table is not read, and the top-level checkpoint is the last one)", modes=TRAIN),
    Param("bucket", bool, True, "aspect-ratio buckets (train_target unet and lora): each image is resized to the "
          "training size of about resolution² pixels whose aspect ratio is nearest its own (sides multiples of 4 "
          "latent pixels, from 1:4 to 4:1), cropping only the small rest; each micro-batch comes from one bucket. "
          "False: every image is resized so its short side is the resolution and cropped to a square",
          modes=TRAIN),
    Param("skip_small_images", bool, False, "leave out images that would be upscaled more than 2× per side to their "
          "training size (they are otherwise kept, with a warning naming their lines)", modes=TRAIN),
    Param("center_crop", bool, True, "crop what does not fit at the centre; False: at a seeded random position, as "
          "diffusers' scripts (random_crop=True)", modes=TRAIN),
    Param("random_crop", bool, False, "crop what does not fit at a random position (seeded per sample)",
          modes=TRAIN),
    Param("random_flip", bool, False, "flip horizontally with probability 0.5 (seeded per sample); off by default "
          "because captions may name left and right", modes=TRAIN),
    Param("train_text_encoder", bool, False, "also train the text encoder (otherwise it stays frozen, bit-exact)",
          modes=TRAIN),
    Param("use_ema", bool, True, "keep an exponential moving average of the trained weights, updated every "
          "optimiser step; the EMA weights are what the checkpoint holds for inference", modes=TRAIN),
    Param("ema_decay", float, 0.999, "EMA decay per optimiser step (warmed up as min(decay, (1+n)/(10+n)))",
          modes=TRAIN, check=_unit),
    Param("caption_dropout", float, 0.1, "probability of training on an empty caption (for classifier-free "
          "guidance)", modes=TRAIN, check=_unit),
    Param("snr_gamma", float, 0.0, "Min-SNR loss weighting gamma (0: plain MSE; 5.0 is the usual choice)",
          modes=TRAIN, check=_non_negative),
    Param("high_noise_share", float, 0.0, "share of the training samples whose timestep is drawn from "
          "[high_noise_from, last] instead of the whole schedule: the noisiest steps, where the layout (size, "
          "position) is decided (0: none)", modes=TRAIN, check=_unit),
    Param("high_noise_from", int, 900, "the first timestep of high_noise_share's range", modes=TRAIN,
          check=_non_negative),
    Param("high_noise_loss", str, "epsilon", "epsilon: those samples have the usual loss; x0: the error of the clean "
          "latents they imply (1/SNR on the epsilon error), and the two groups are averaged separately and mixed "
          "as high_noise_share : 1 - high_noise_share", modes=TRAIN, choices=("epsilon", "x0")),
    Param("noise_offset", float, 0.0, "offset noise strength (helps very dark/bright images)", modes=TRAIN,
          check=_non_negative),
    Param("weighting_scheme", str, "none", "flow-matching models (Z-Image, Qwen-Image): how training timesteps are "
          "drawn and the loss weighted, as diffusers.training_utils does (none: uniform; logit_normal, mode: timestep "
          "densities; sigma_sqrt, cosmap: loss weights)", modes=TRAIN,
          choices=("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")),
    Param("logit_mean", float, 0.0, "mean of weighting_scheme=logit_normal", modes=TRAIN),
    Param("logit_std", float, 1.0, "standard deviation of weighting_scheme=logit_normal", modes=TRAIN,
          check=_positive),
    Param("mode_scale", float, 1.29, "scale of weighting_scheme=mode", modes=TRAIN),
    Param("gradient_checkpointing", bool, False, "recompute activations in backward to save memory", modes=TRAIN),
    Param("not_use_gradient_checkpoint", bool, None, "EasyNLP's inverse of gradient_checkpointing: True keeps it off "
          "(the default here; EasyNLP's models had it on), False turns it on", modes=TRAIN),
    Param("cache_latents", bool, True, "encode each image with the frozen VAE once, not every epoch "
          "(ignored with random crops/flips, which change the pixels every epoch)", modes=TRAIN),
    # Memory plan (memory_plan.py over easynlp_ldm/memory.py): estimated before the first step; refused if too big.
    Param("optimizer", str, "adamw", "adamw: the optimiser --optimizer_type names (AdamW by default: two fp32 "
          "moments, 8 bytes per trained parameter); adafactor: transformers' Adafactor with factored second moments "
          "and no first moment (a few % of that for linear layers, 2/3 of the weights for 3×3 convolutions), "
          "scale_parameter=False, relative_step=False, at --learning_rate", modes=TRAIN,
          choices=("adamw", "adafactor")),
    Param("save_optimizer", bool, True, "save the optimiser state with each checkpoint's training state (False: "
          "checkpoints about the model's size — the trained weights are hard links to the saved model's file when "
          "they are its weights — and --resume_from_checkpoint restarts the optimiser, with a warning)",
          modes=TRAIN),
    Param("ema_device", str, "", "where the EMA weights live: empty, the training device; cpu keeps them in RAM "
          "(frees 4 bytes per trained parameter of GPU memory, at the cost of a copy to the CPU every step)",
          modes=TRAIN, choices=("", "cpu")),
    Param("sharding", str, "none", "none: every process holds the whole trained model (DDP); fsdp: the trained "
          "modules sharded per block across the processes with PyTorch's FSDP2 (weights, gradients, optimiser and "
          "EMA 1/N per process; the checkpoint is gathered into the usual folder, the training state is a "
          "distributed checkpoint any number of processes resumes)", modes=TRAIN, choices=("none", "fsdp")),
    Param("memory_limit_gb", float, 0.0, "memory the run may use, in GiB (0: what the machine has — the GPU's free "
          "memory when training on one, else RAM, within the cgroup's memory.max): the estimated peak is checked "
          "against it before the first step", modes=TRAIN, check=_non_negative),
    Param("memory_check", bool, True, "refuse a run whose estimated peak memory exceeds the memory available, "
          "naming the options that would make it fit (False: log a warning and try anyway)", modes=TRAIN),
    Param("sample_images", int, 2, "sample images written to TensorBoard at each checkpoint (generated from the "
          "first validation captions for train_target=unet, reconstructions for vae/vae_decoder, ×4 upscales for "
          "rrdb); 0: none", modes=TRAIN, check=_non_negative),
    Param("sample_steps", int, 10, "sampler steps of those sample images (train_target=unet)", modes=TRAIN,
          check=_positive),
    Param("sample_time_share", float, 0.1, "the largest share of the training wall time the sample images may "
          "take: at a checkpoint they are skipped (with a log line saying why) when, at the last sampling's seconds "
          "per image, generating them would bring the sampling time above this share (the first sampling always "
          "runs; 1: no limit)", modes=TRAIN, check=_unit),
    # Generation.
    Param("n_samples", int, 4, "images per prompt per iteration", modes=GENERATE, check=_positive),
    Param("n_iter", int, 1, "iterations; each prompt gets n_samples × n_iter images", modes=PREDICT,
          check=_positive),
    Param("scale", float, None, "classifier-free guidance scale (1: no guidance; default: the model folder's, "
          "e.g. 0 for Z-Image-Turbo, else 5)", modes=SAMPLING,
          aliases=("guidance_scale",), check=_non_negative),
    Param("guidance_cutoff", float, 1.0, "fraction of the steps (the first ones) that use classifier-free "
          "guidance; the rest run the prompt's pass alone, at half the cost (1: every step, as diffusers does)",
          modes=SAMPLING, check=lambda v: None if 0 < v <= 1 else "must be within (0, 1]"),
    Param("guidance_rescale", float, 0.0, "rescale the guided prediction towards the text-only one's standard "
          "deviation (0: off; 0.7 is the paper's choice against over-exposure at high guidance)", modes=SAMPLING,
          check=_unit),
    Param("strength", float, 0.0, "img2img and inpainting (an input image column / request field): how much of the "
          "input image is noised away and redrawn, 0–1 (0: diffusers' defaults, 0.8 for img2img and 1.0 for "
          "inpainting)", modes=SAMPLING, check=_unit),
    Param("controlnet", str, "", "ControlNet(s): diffusers ControlNetModel folders, each with an optional "
          "conditioning scale, separated by commas: path[:scale],path[:scale] (the conditioning images come from the "
          "table's control column, or the request's control_image field); with train_target=controlnet, the one "
          "ControlNet to continue training (default: a new one from the model's UNet)", modes=SAMPLING | TRAIN),
    Param("control_preprocessor", str, "none", "what turns a conditioning image into the ControlNet's input: none "
          "(the image is the ready conditioning image), canny (its Canny edges, thresholds 100/200)",
          modes=SAMPLING, choices=("none", "canny")),
    Param("ddim_steps", int, None, "sampler steps (default: the model folder's, e.g. 9 for Z-Image-Turbo, else 20)",
          modes=SAMPLING, aliases=("num_inference_steps",), check=_positive),
    Param("ddim_eta", float, 0.0, "DDIM eta (stochasticity) for sampler=ddim; a non-zero value with any other "
          "sampler (PLMS, the model's own scheduler unless it is DDIM, ...) is an error, as in EasyNLP", modes=SAMPLING,
          check=_unit),
    Param("sampler", str, "", "sampler by short name: plms, ddim, dpm-solver++, dpm-solver, euler, "
          "euler-ancestral, heun, lms, unipc, deis, ... (default: the model's own scheduler); Z-Image models: euler; "
          "Qwen-Image models: euler, unipc", modes=SAMPLING),
    Param("H", int, 0, "image height in pixels (0: the model's native size); a multiple of the model's "
          "downsampling factor (8 for SD-style models)", modes=SAMPLING, aliases=("height",), check=_non_negative),
    Param("W", int, 0, "image width in pixels (0: the model's native size); a multiple of the model's "
          "downsampling factor (8 for SD-style models)", modes=SAMPLING, aliases=("width",), check=_non_negative),
    Param("negative_prompt", str, "", "text the images should not look like (quote it if it has spaces)",
          modes=SAMPLING),
    Param("cfg_normalization", float, 0.0, "Z-Image models: cap the guided prediction's norm at this multiple of "
          "the prompt-only one's (0: off, as ZImagePipeline's default)", modes=SAMPLING, check=_non_negative),
    Param("cfg_truncation", float, 1.0, "Z-Image models: guidance stops at the steps whose t/1000 is past this "
          "(1: guided at every step, as ZImagePipeline's default)", modes=SAMPLING, check=_non_negative),
    Param("true_cfg_scale", float, None, "Qwen-Image models: classifier-free guidance scale, with negative_prompt "
          "(empty or not) as the unconditional text; 1: no guidance (scale is only the input of a "
          "guidance-distilled transformer; default: the model folder's, else 4)", modes=SAMPLING, check=_non_negative),
    Param("lora", str, "", "LoRA adapters applied to the model, merged into its weights: path[:scale],path[:scale] "
          "— a .safetensors file (diffusers', peft's or kohya-ss/WebUI format) or a folder holding "
          "pytorch_lora_weights.safetensors (what train_target=lora writes); scale 1 by default",
          modes=SAMPLING | EXPORT),
    Param("truth_file", str, "", "evaluate: ground-truth sidecar (JSON lines with idx, colour, shape, heldout) for "
          "the prompt-following accuracy; default: TABLE.truth.jsonl beside the table when it exists",
          modes=EVALUATE),
    Param("clip_model", str, "", "evaluate: CLIP score (100 × cosine, floored at 0) of each generated image with its "
          "prompt, from this local folder (transformers ChineseCLIPModel, AltCLIPModel or CLIPModel)", modes=EVALUATE),
    Param("preference_model", str, "", "evaluate: human-preference score of each generated image with its prompt, "
          "from this local folder (a PickScore-style transformers CLIP checkpoint)", modes=EVALUATE),
    Param("preference_processor", str, "", "evaluate: the folder holding preference_model's processor files where "
          "its own folder has none (PickScore_v1: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)", modes=EVALUATE),
    Param("fid_weights", str, "", "evaluate: FID and KID of the generated images against the reference images "
          "(the table's image column, or fid_reference=), from this local Inception weights file", modes=EVALUATE),
    Param("fid_reference", str, "", "evaluate: a folder of reference images for FID/KID (default: the table's image "
          "column)", modes=EVALUATE),
    Param("evaluate_output", str, "", "evaluate: a folder for the generated images (images/MODEL/IDX.png), the "
          "per-image scores (scores.tsv), an HTML report (report.html) and summary.json", modes=EVALUATE),
    Param("compare_with", str, "", "evaluate: a second model (folder or name) generating from the same prompts and "
          "seeds as --checkpoint_dir; the summary gives each metric's difference (this one − --checkpoint_dir) with "
          "a bootstrap confidence interval (also: --checkpoint_dir=A,B)", modes=EVALUATE),
    Param("bootstrap_resamples", int, 2000, "evaluate: resamples of the prompts for the 95% confidence interval of "
          "a comparison's differences", modes=EVALUATE, check=_positive),
    Param("optimize", str, "auto", "inference speed: auto (CPU: openvino when installed, else torch; CUDA: torch), "
          "max (CUDA: compile; CPU: as auto), openvino (CPU: UNet and VAE decoder as OpenVINO compiled models, "
          "IR cached on disk, bf16 where the CPU has it), torch (PyTorch eager: bf16/fp16 UNet and text encoder, "
          "fused QKV and GEGLUs, SDPA), compile (torch + torch.compile), none (fp32 eager, the reference diffusers "
          "computes); the scheduler, latents and initial noise stay fp32 at every level",
          modes=SAMPLING, choices=("none", "auto", "max", "openvino", "torch", "compile")),
    Param("precision", str, "", "override the dtype chosen by optimize: fp32, bf16 or fp16", modes=SAMPLING,
          choices=("", "fp32", "bf16", "fp16")),
    Param("write_image", bool, False, "also write image files under image_prefix", modes=PREDICT),
    Param("image_prefix", str, "./", "folder for image files (write_image=True)", modes=PREDICT),
    Param("image_format", str, "png", "png or jpeg", modes=GENERATE, choices=("png", "jpeg", "jpg")),
    # AIGC labels (GB 45438-2025; easynlp_ldm/aigc.py).
    Param("aigc_label", bool, True, "label every image as AI-generated as GB 45438-2025 requires: its AIGC fields "
          "in the file's XMP and a PNG text chunk (False: no labels, with a warning that published content must carry "
          "them)", modes=GENERATE),
    Param("aigc_visible_label", bool, False, "also draw the visible label \"AI生成\" in the image's corner (the "
          "web page asks for it on the images it offers)", modes=GENERATE),
    Param("aigc_producer", str, "", "ContentProducer of the AIGC label: the service provider's name or code "
          "(default: easynlp-ldm@<hostname>)", modes=GENERATE),
    Param("aigc_propagator", str, "", "ContentPropagator of the AIGC label (default: easynlp-ldm@<hostname>)",
          modes=GENERATE),
    Param("do_sr", bool, False, "apply ESRGAN ×4 super-resolution (needs RRDB_ESRGAN_x4.pth with the model)",
          modes=GENERATE),
    Param("sr_channel_order", str, "", "channel order the ESRGAN weights expect: rgb (the original ESRGAN test "
          "script and released weights) or bgr (EasyNLP's swap); default: the model's config, else rgb",
          modes=GENERATE, choices=("", "rgb", "bgr")),
    Param("sr_tile", int, 256, "super-resolution tile size in input pixels (0: whole image at once)",
          modes=GENERATE, check=_non_negative),
    # Serving.
    Param("max_batch_size", int, 8, "serve: images per model call; concurrent compatible requests share it",
          modes=SERVE, check=_positive),
    Param("max_wait_ms", float, 50.0, "serve: how long the first request of a batch waits for companions",
          modes=SERVE, check=_non_negative),
    Param("max_queue", int, 64, "serve: queued requests before answering 'queue full' with Retry-After: 450 on "
          "the EAS routes (EAS's status; EAS's default queue is 64), 429 on /v1/images/generations (OpenAI's)",
          modes=SERVE, check=_positive),
    Param("max_num_images", int, 8, "serve: largest num_images a request may ask for", modes=SERVE,
          check=_positive),
    Param("max_steps", int, 100, "serve: largest num_inference_steps a request may ask for", modes=SERVE,
          check=_positive),
    Param("max_size", int, 0, "serve: largest width/height a request may ask for (0: twice the model's native size)",
          modes=SERVE, check=_non_negative),
    Param("max_request_work", int, 400, "serve: largest num_images × num_inference_steps × (width×height ÷ native "
          "size²) of one request, i.e. native-size image steps (400: 8 images × 50 steps, or 1 × 100 at twice the "
          "size)", modes=SERVE, check=_positive),
    Param("max_text_chars", int, 1000, "serve: longest text in characters (past the model's context in tokens the "
          "rest is ignored, and the answer says so in 'warnings'), and of every other text field (negative_prompt, "
          "sampler, lora names)", modes=SERVE, check=_positive),
    Param("max_image_pixels", int, 4096 * 4096, "serve: largest image (image, mask, control_image) in pixels, "
          "width × height read from the file's header before its pixels are decoded (400 past it); images are "
          "shrunk to the generation size before they are queued", modes=SERVE,
          check=lambda v: None if 0 < v <= 200_000_000 else "must be within 1..200000000"),
    Param("max_cached_shapes", int, 4, "serve: compiled models kept per model part (UNet, VAE decoder), one per "
          "input shape (images × width × height of a batch's part per stream): OpenVINO releases the least recently "
          "used past it (each holds the weights in its own layout: 100-150 MB on the embedded model); with "
          "optimize=compile, shapes past it run eagerly", modes=SERVE, check=_positive),
    Param("max_body_bytes", int, 16 << 20, "serve: largest request body in bytes (413 past it; room for an input "
          "image, its mask and a conditioning image at 1024²)", modes=SERVE,
          check=_positive),
    Param("request_timeout", float, 300.0, "serve: seconds a request may take (queue + generation)", modes=SERVE,
          check=_positive),
    Param("body_timeout", float, 30.0, "serve: seconds for a request's body to arrive (408 past it)", modes=SERVE,
          check=_positive),
    Param("header_timeout", float, 10.0, "serve: seconds for a request's headers to arrive (408 and close past it)",
          modes=SERVE, check=_positive),
    Param("max_connections", int, 256, "serve: open connections at once (503 past it)", modes=SERVE,
          check=_positive),
    Param("shutdown_timeout", float, 30.0, "serve: on SIGTERM, seconds the running work may take to finish (queued "
          "requests are answered 503 at once)", modes=SERVE, check=_positive),
    Param("retry_grace", float, 1.0, "serve: seconds a request whose client went away keeps running when nothing "
          "else waits, so that the client's identical retry (the EAS SDK retries after its timeout) takes it over",
          modes=SERVE, check=_non_negative),
    Param("keep_alive", int, 75, "serve: HTTP keep-alive seconds (image services need minutes, not EAS's 5 s)",
          modes=SERVE, check=_positive),
    Param("lora_library", str, "", "serve: LoRA adapters loaded once beside the model, name=path,name=path; a "
          "request chooses some with scales, \"lora\": {\"name\": 0.8}, switched without reloading anything (the "
          "UNet's QKV/GEGLU projections then stay unfused)", modes=SERVE),
    Param("service_name", str, "", "serve: the EAS service name answered at /api/predict/<service_name> (empty: "
          "any name)", modes=SERVE),
    Param("auth_max_skew", float, 900.0, "serve: seconds the Date of an EAS-signed request may be off the server's "
          "clock", modes=SERVE, check=_non_negative),
    Param("auth_local_time", bool, True, "serve: also accept an EAS-signed Date that is off by a time-zone offset "
          "(the EAS SDK stamps local time labelled GMT); False when every client runs in UTC", modes=SERVE),
    Param("docs", bool, False, "serve: also serve /openapi.json and Swagger at /docs (the page loads Swagger's "
          "scripts from a CDN, so it is blank offline)", modes=SERVE),
    # Export.
    Param("export_format", str, "tar", "export: tar (a .tar.gz of config.json, pytorch_model.bin, vocab.txt and "
          "RRDB_ESRGAN_x4.pth when present), diffusers (a folder StableDiffusionPipeline.from_pretrained loads; "
          "with trust_remote_code=True for EasyNLP's Wukong text encoder, whose code it holds) or easynlp (a folder "
          "in EasyNLP's own latent_diffusion format; Wukong-conditioned models only); each export is loaded back "
          "and checked before it is in place",
          modes=EXPORT, choices=("tar", "diffusers", "easynlp")),
    Param("lora_format", str, "", "export: instead of the model, the LoRA given as lora= (one file or run folder, "
          "its scale applied) as one .safetensors file at --outputs in this key layout: comfyui (ComfyUI's "
          "diffusion_model.<module>.lora_A/lora_B with alpha; Z-Image and Qwen-Image models); checked by loading it "
          "back with diffusers' loader before it is in place",
          modes=EXPORT, choices=("", "comfyui")),
)


def default_params(**overrides) -> dict:
    """Every parameter at its declared default, with ``overrides`` (for scripts and benchmarks)."""
    values = {param.name: param.default for param in PARAMS}
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"unknown parameters: {', '.join(sorted(unknown))}")
    values.update(overrides)
    return values

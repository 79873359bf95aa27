from setuptools import find_packages, setup

setup(
    name="easynlp-ldm",
    version="0.1.0",
    description="EasyNLP-compatible Chinese text-to-image latent diffusion: train, predict, evaluate, serve, export",
    packages=find_packages(include=["easynlp_ldm", "easynlp_ldm.*", "appzoo", "appzoo.*", "modelzoo", "modelzoo.*",
                                    "shapes_data", "shapes_data.*"]),
    package_data={"modelzoo": ["pretrained/*/*", "pretrained/*/*/*"], "appzoo": ["latent_diffusion/static/*"],
                  "easynlp_ldm": ["assets/*.png"]},
    python_requires=">=3.10",
    # Ranges, not pins: torch must already be installed (CPU or CUDA build of the user's choice) and satisfy this.
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors",
        "pillow>=10",
        "numpy",
        "tensorboard",
        "tqdm",
        "fastapi",
        "uvicorn",
        "huggingface_hub>=1.23",  # offline snapshot lookup (easynlp_ldm/hub.py)
        "peft>=0.17",  # LoRA (modelzoo/lora.py)
        "openvino>=2025.0",  # optimize=auto on CPU (modelzoo/openvino_backend.py)
    ],
    extras_require={"lowbit": ["torchao>=0.18"]},  # base_precision=int8|fp8|nf4 (modelzoo/lowbit.py)
    entry_points={"console_scripts": ["easynlp=easynlp_ldm.cli:entry_point"],
                  # the framework finds apps by this group (easynlp_ldm/apps.py), never by importing appzoo
                  "easynlp_ldm.apps": ["appzoo=appzoo.registry:APPS"]},
)

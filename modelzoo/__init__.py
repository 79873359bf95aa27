"""The models. Importing the package filters out of their loggers the messages that torchao's import causes (diffusers
imports torchao whenever it is installed, for base_precision=int8|fp8|nf4, modelzoo/lowbit.py): on a CPU build of
torch its CUDA kernels (and Triton's) do not load, torch says torchao's enums need no registering, diffusers that
torchao moved NF4Tensor — none of it concerns this toolkit, which neither uses those kernels nor loads
torchao-serialised checkpoints. Nothing else is filtered."""

import logging

_TORCHAO_IMPORT_NOISE = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


def _filter(prefixes: tuple[str, ...]):
    return lambda record: not any(prefix in str(record.msg) for prefix in prefixes)


for _name, _prefixes in _TORCHAO_IMPORT_NOISE.items():
    logging.getLogger(_name).addFilter(_filter(_prefixes))

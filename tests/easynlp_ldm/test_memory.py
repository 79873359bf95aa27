"""The generic memory budget (easynlp_ldm/memory.py): parts an app's activation plan adds, the optimiser's state, the
memory available (RAM within the cgroup's limit). The latent_diffusion app's plan: tests/appzoo/latent_diffusion/
test_memory_plan.py."""

import dataclasses

from easynlp_ldm import cgroups, memory

GIB = memory.GIB
SETTINGS = memory.MemorySettings(micro_batch_size=2, resolution=64, gradient_checkpointing=False, use_amp=False,
                                 optimizer="adamw", use_ema=False, ema_device="", save_optimizer=True, device="cpu")


@dataclasses.dataclass(frozen=True)
class PerSampleActivations:
    """A plan of bytes per sample: one step part and an encode pass."""

    labels = {"feature_maps": "feature maps", "encode": "encoder"}

    def step(self, settings):
        return {"feature_maps": GIB * settings.micro_batch_size}

    def encode(self, settings):
        return GIB // 2 if settings.cache_inputs else 0


def test_an_apps_plan_adds_its_parts_to_the_step_and_the_encode_pass():
    footprint = memory.ModelFootprint(trained={"net": [(1024, 1024)]}, frozen={"encoder": 1 << 20},
                                      activations=PerSampleActivations())
    result = memory.estimate(footprint, SETTINGS)
    assert result.parts["feature_maps"] == 2 * GIB and result.parts["encode"] == GIB // 2
    bare = memory.estimate(dataclasses.replace(footprint, activations=None), SETTINGS)
    assert "feature_maps" not in bare.parts and bare.parts["encode"] == 0
    assert result.host["step"] - bare.host["step"] == 2 * GIB
    assert result.host["encode"] - bare.host["encode"] == GIB // 2
    assert "feature maps 2.00" in result.describe() and "encoder 0.50" in result.describe()
    assert memory.estimate(footprint, dataclasses.replace(SETTINGS, cache_inputs=False)).parts["encode"] == 0


def test_adafactor_state_is_factored():
    shapes = [(320, 320), (1280, 320, 3, 3), (320,)]
    assert memory.optimizer_state_elements(shapes, "adamw") == 2 * (320 * 320 + 1280 * 320 * 9 + 320)
    # matrix: row + column; 3×3 convolution: factored over its last two dimensions; vector: in full
    assert memory.optimizer_state_elements(shapes, "adafactor") == (320 + 320) + 2 * 1280 * 320 * 3 + 320


def test_available_memory_on_cpu():
    available, source = memory.available_memory("cpu")
    assert available > 0 and ("RAM" in source or "cgroup" in source)


def test_available_memory_is_the_cgroups_limit_when_lower(monkeypatch):
    monkeypatch.setattr(cgroups, "memory_limit", lambda root=cgroups.ROOT: (1 << 20, "cgroup /x/memory.max"))
    assert memory.available_memory("cpu") == (1 << 20, "cgroup /x/memory.max")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory.available_memory("cpu") == (1 << 19, "cgroup /x/memory.max, shared by 2 processes")

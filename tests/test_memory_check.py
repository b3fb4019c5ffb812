"""The CPU memory measurement (pangu_sigma.tools.memory_check): the method measures what it
claims, and train.recompute really frees activations where the runtime frees memory
(PyNative: tensors are released by reference count). The measured-vs-predicted table
itself is printed by the tool (see its docstring for why GRAPH mode on CPU cannot check
the model)."""
import pytest

from pangu_sigma.tools import memory_check


@pytest.fixture(scope="module")
def cases():
    return memory_check.compare([memory_check.measure(batch, level, "pynative")
                                 for batch in (2, 4, 8) for level in ("none", "block")])


def test_step_growth_grows_with_the_batch(cases):
    for level in ("none", "block"):
        growth = [c["step_growth"] for c in sorted(cases, key=lambda c: c["batch"]) if c["recompute"] == level]
        assert growth[0] < growth[1] < growth[2], (level, growth)


def test_block_recompute_lowers_measured_step_memory(cases):
    by = {(c["batch"], c["recompute"]): c for c in cases}
    for batch in (4, 8):
        assert by[(batch, "block")]["step_growth"] < 0.85 * by[(batch, "none")]["step_growth"], batch
    # and the model predicts the same direction
    assert by[(8, "block")]["predicted_activations"] < by[(8, "none")]["predicted_activations"]


def test_table_has_every_case(cases):
    text = memory_check.table(cases)
    assert text.count("pynative") >= 6 and "none/block" in text

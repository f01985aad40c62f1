"""The checker-based evaluation of trained text-to-image models (distgen.bench.adherence)."""

import pytest

from distgen.bench.adherence import _summary, held_out_prompts, one_rank_adherence
from distgen.models.train.scenes import parse_caption, sample_scene


def test_held_out_prompts_are_fixed_parsable_and_outside_the_training_range():
    prompts = held_out_prompts(20)
    assert prompts == held_out_prompts(20) and len(set(prompts)) > 10
    for prompt in prompts:
        assert parse_caption(prompt).objects  # the checker can score every one
    training = {sample_scene(0, i).caption for i in range(2000)}
    assert sum(p in training for p in prompts) < len(prompts)  # drawn from other scene indices


def test_summary_weights_prompts_by_their_objects():
    one = {"adherence": 1.0, "found_with_colour": 1.0, "found": 1.0, "right_colour": 1.0, "right_shape": 1.0,
           "right_position": 1.0, "objects": 1}
    two = {**{k: 0.0 for k in one}, "objects": 2}
    summary = _summary([one, two])
    assert summary["objects"] == 3 and summary["adherence"] == pytest.approx(1 / 3, abs=1e-4)


@pytest.mark.timeout(120)
def test_one_rank_adherence_runs_the_saved_pipeline(tmp_path):
    from distgen.models.tiny import build_pipeline, save_pipeline

    directory = save_pipeline(build_pipeline("unet", seed=0), tmp_path / "tiny")
    summary, images = one_rank_adherence(str(directory), held_out_prompts(3), 64, 2, 4.0, 0)
    assert len(images) == 3 and images[0].size == (64, 64)
    assert summary["prompts"] == 3 and 0.0 <= summary["found_with_colour"] <= 1.0

"""The evaluation suite's parts against cases whose answer is known: caption parsing, COCO mAP,
the caption -> rgb judge on rendered scenes (with their true segmentation), the floors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fourm.data.loader import LoaderConfig, build_loader
from fourm.eval.captions import object_counts, object_match, parse_caption, precision_recall_f1, scene_object_counts
from fourm.eval.detection import coco_map
from fourm.data.synth.scene import CLASSES, COLORS
from fourm.eval.judge import color_name, find_objects, judge, summarize
from fourm.eval.suite import check_targets, markdown_report, training_floors
from fourm.generation.sampling import TEXT_TO_IMAGE


def test_parse_caption_objects_and_relations():
    p = parse_caption("there is a large red sphere to the left of a small blue cube, and a small gray cylinder behind the red sphere")
    assert [(o.color, o.shape, o.size) for o in p.objects] == [("red", "sphere", "large"), ("blue", "cube", "small"), ("gray", "cylinder", "small")]
    assert p.relations == [(0, "left", 1), (2, "behind", 0)]
    assert object_counts("a small cyan cube stands alone") == Counter({("cyan", "cube"): 1})
    assert object_counts("nothing to see") == Counter()


def test_object_precision_recall():
    tp, n_pred, n_true = object_match(Counter({("red", "cube"): 2, ("blue", "sphere"): 1}), Counter({("red", "cube"): 1, ("gray", "cylinder"): 1}))
    assert (tp, n_pred, n_true) == (1, 3, 2)
    s = precision_recall_f1(tp, n_pred, n_true)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(0.5) and s["f1"] == pytest.approx(0.4)
    assert scene_object_counts({"objects": [{"color": "red", "shape": "cube", "visible_pixels": 10}, {"color": "red", "shape": "cube", "visible_pixels": 0}]}) == Counter({("red", "cube"): 1})


def test_coco_map_hand_cases():
    truth = [[{"bbox": [0, 0, 10, 10], "label": "large red cube"}], [{"bbox": [20, 20, 40, 40], "label": "small blue sphere"}]]
    perfect = coco_map(truth, truth, ("sphere", "cube", "cylinder"))
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    # right boxes, wrong class on one image: half the categories found -> AP 1 for cube, 0 for sphere
    wrong = [truth[0], [{"bbox": [20, 20, 40, 40], "label": "small blue cube"}]]
    assert coco_map(wrong, truth, ("sphere", "cube", "cylinder"))["map50"] == pytest.approx(0.5, abs=0.01)
    # a box with IoU 0.6 counts at 0.5 but not at 0.75
    shifted = [[{"bbox": [0, 0, 10, 6], "label": "cube"}], truth[1]]
    m = coco_map(shifted, truth, ("sphere", "cube", "cylinder"))
    assert m["map50"] == pytest.approx(1.0) and m["map75"] == pytest.approx(0.5, abs=0.01)
    assert coco_map([[], []], truth, ("sphere", "cube", "cylinder"))["map"] == 0.0
    assert coco_map([[{"bbox": [0, 0, 1, 1], "label": "tree"}], []], truth, ("sphere", "cube", "cylinder"))["unlabelled"] == 1


def test_color_names_survive_shading():
    for name, rgb in COLORS.items():
        shaded = (np.array(rgb, float)[None] * np.linspace(0.4, 1.0, 20)[:, None]).astype(np.uint8)
        assert color_name(shaded) == name, name


@pytest.fixture(scope="module")
def scenes(synth_dir):
    loader, _ = build_loader(synth_dir, LoaderConfig(modalities=("rgb", "semseg", "caption"), optional=("scene",), batch_size=64, shuffle=0, num_workers=0))
    return next(iter(loader))


def test_judge_on_true_images_with_true_segmentation(scenes):
    """With the renderer's own segmentation the judge must pass most true (image, caption) pairs
    (touching objects of one colour and tiny ones are its known misses) and fail mismatched pairs."""
    verdicts, shuffled = [], []
    n = len(scenes["caption"])
    for i in range(n):
        rgb, seg = scenes["rgb"][i].permute(1, 2, 0).numpy(), scenes["semseg"][i].numpy()
        found = find_objects(rgb, seg)
        verdicts.append(judge(scenes["caption"][i], found))
        shuffled.append(judge(scenes["caption"][(i + 1) % n], found))
        truth = scene_object_counts(scenes["scene"][i])
        assert sum((Counter((o["color"], o["shape"]) for o in found) - truth).values()) <= 1  # hardly any invented object
    true_acc, shuffled_acc = summarize(verdicts)["accuracy"], summarize(shuffled)["accuracy"]
    assert true_acc >= 0.75 and shuffled_acc <= 0.15, (true_acc, shuffled_acc)  # 0.875 and 0.0 measured


def test_find_objects_splits_by_colour_and_votes_on_shape():
    """Touching objects of one shape class but two colours are two objects; a few pixels of an
    object labelled with another shape neither invent an object nor change its shape."""
    red, blue = COLORS["red"], COLORS["blue"]
    rgb = np.full((32, 32, 3), 200, np.uint8)
    seg = np.ones((32, 32), np.int64)  # ground
    rgb[8:16, 4:12], rgb[8:16, 12:20] = red, blue  # two cubes side by side: one connected region
    seg[8:16, 4:20] = CLASSES.index("cube")
    seg[8:10, 4:6] = CLASSES.index("sphere")  # 4 mislabelled pixels of the red cube
    found = sorted(find_objects(rgb, seg), key=lambda o: o["cx"])
    assert [(o["color"], o["shape"]) for o in found] == [("red", "cube"), ("blue", "cube")]
    assert found[0]["pixels"] == 64 and judge("a red cube left of a blue cube", found)["correct"]
    # one colour, two shapes each holding a large part: split by shape
    seg[8:16, 12:20], rgb[8:16, 12:20] = CLASSES.index("sphere"), red
    assert sorted((o["color"], o["shape"]) for o in find_objects(rgb, seg)) == [("red", "cube"), ("red", "sphere")]


def test_a_small_object_touching_a_large_one_is_found():
    """A small object in front of a large one of another colour is its own object even when it
    is under a tenth of their connected region (it borders the ground), while a highlight of the
    same size inside an object (it borders none) is not."""
    blue, green = COLORS["blue"], COLORS["green"]
    rgb = np.full((32, 32, 3), 200, np.uint8)
    seg = np.ones((32, 32), np.int64)
    rgb[4:18, 4:18], seg[4:18, 4:18] = blue, CLASSES.index("cube")  # 196 pixels
    rgb[18:22, 8:12], seg[18:22, 8:12] = green, CLASSES.index("sphere")  # 16 pixels: 7.5% of the region
    found = sorted(find_objects(rgb, seg), key=lambda o: o["pixels"])
    assert [(o["color"], o["shape"]) for o in found] == [("green", "sphere"), ("blue", "cube")]
    assert judge("a green sphere in front of a blue cube", found)["correct"]
    rgb[18:22, 8:12], seg[18:22, 8:12] = 200, CLASSES.index("ground")
    rgb[8:12, 8:12] = COLORS["gray"]  # a highlight: 16 pixels inside the cube
    assert [(o["color"], o["shape"]) for o in find_objects(rgb, seg)] == [("blue", "cube")]


def test_a_blended_outline_is_not_an_object_of_its_own():
    """A decoded image's object edge blends into the ground and reads as another colour along the
    outline: a thin rim of it is not a second object (it was, before the judge's opening), while
    a solid part of the same size still is."""
    red, gray = COLORS["red"], COLORS["gray"]
    rgb = np.full((32, 32, 3), 200, np.uint8)
    seg = np.ones((32, 32), np.int64)
    rgb[8:18, 8:18], seg[8:18, 8:18] = gray, CLASSES.index("cube")  # outline: 36 gray pixels, 36% of the region
    rgb[9:17, 9:17] = red
    assert [(o["color"], o["shape"]) for o in find_objects(rgb, seg)] == [("red", "cube")]
    rgb[8:18, 18:22], seg[8:18, 18:22] = gray, CLASSES.index("cube")  # a solid gray cube touching it
    assert sorted((o["color"], o["shape"]) for o in find_objects(rgb, seg)) == [("gray", "cube"), ("red", "cube")]


def test_judge_relations_and_counts():
    a = {"shape": "cube", "color": "red", "cx": 10.0, "bottom": 30.0, "pixels": 50}
    b = {"shape": "sphere", "color": "blue", "cx": 40.0, "bottom": 20.0, "pixels": 50}
    assert judge("a red cube left of a blue sphere", [a, b])["correct"]
    assert judge("a red cube in front of a blue sphere", [a, b])["correct"]
    assert not judge("a red cube right of a blue sphere", [a, b])["relations"]
    assert not judge("a red cube left of a blue sphere", [a, b, dict(a, cx=50.0)])["count"]
    assert not judge("a green cube left of a blue sphere", [a, b])["objects"]


def test_training_floors_and_target_table(synth_dir):
    floors = training_floors(synth_dir, 5, scenes=1000)
    loader, _ = build_loader(synth_dir, LoaderConfig(modalities=("depth", "semseg"), batch_size=1000, shuffle=0, num_workers=0))
    batch = next(iter(loader))
    torch.testing.assert_close(floors["mean_depth"], batch["depth"].double().mean(0).float())
    counts = torch.nn.functional.one_hot(batch["semseg"].long(), 5).sum(0)
    assert torch.equal(floors["majority"], counts.argmax(-1)) and floors["scenes"] == len(batch["depth"])
    report = {"model": {"rgb_to_depth": {"delta1": 0.96, "abs_rel": 0.04}, "rgb_to_semseg": {"miou": 0.5}}, "floor": {"rgb_to_depth": {"abs_rel": 0.1}}, "ceiling": {}}
    t = check_targets(report)
    assert t["rgb_to_depth"]["met"] is True and t["rgb_to_semseg"]["met"] is False and t["rgb_to_boxes"]["met"] is None
    report["model"]["rgb_to_depth"]["abs_rel"] = 0.06  # more than half the floor's
    assert check_targets(report)["rgb_to_depth"]["met"] is False
    assert "| rgb → semseg | miou | - | 0.500 | - | >= 0.75 | no |" in markdown_report(report)


def test_judge_segmenter_save_load_and_foreign_files(tmp_path, synth_dir):
    from safetensors.torch import save_file

    from fourm.eval.judge import JudgeConfig, Segmenter, load_or_train_segmenter, load_segmenter, save_segmenter

    model = Segmenter(8).eval()
    save_segmenter(model, tmp_path / "j.safetensors")
    rgb = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(load_segmenter(tmp_path / "j.safetensors").segment(rgb), model.segment(rgb))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "old.safetensors"))
    with pytest.raises(ValueError, match="another format"):
        load_segmenter(tmp_path / "old.safetensors")
    from fourm.eval.judge import JUDGE_FORMAT

    save_file({"w": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={"format": JUDGE_FORMAT, "width": "8"})
    with pytest.raises(ValueError, match="do not fit its width 8"):  # the right format, the wrong tensors
        load_segmenter(tmp_path / "bad.safetensors")
    assert load_or_train_segmenter(tmp_path / "old.safetensors", None, JudgeConfig()) is None
    retrained = load_or_train_segmenter(tmp_path / "old.safetensors", synth_dir, JudgeConfig(steps=2, batch_size=4, width=8))
    assert isinstance(retrained, Segmenter) and isinstance(load_segmenter(tmp_path / "old.safetensors"), Segmenter)


def test_the_judge_trains_on_round_trips_of_a_share_of_its_images(synth_dir):
    from fourm.eval.judge import JudgeConfig, train_segmenter

    seen = []

    def round_trip(images):  # stands in for the rgb tokenizer: records what it was given
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        seen.append(len(images))
        return 255 - images

    train_segmenter(synth_dir, JudgeConfig(steps=12, batch_size=8, width=8, round_trip_share=0.5), progress=False, round_trip=round_trip)
    # 12 or 13 batches of 8 drawn (the loop may read one past its last step): about half of ~100
    # images, each batch's own random share
    assert 20 <= sum(seen) <= 80 and all(0 < n <= 8 for n in seen)
    seen.clear()
    train_segmenter(synth_dir, JudgeConfig(steps=4, batch_size=8, width=8, round_trip_share=0.0), progress=False, round_trip=round_trip)
    assert seen == []
    with pytest.raises(ValueError, match="round_trip_share must be in"):
        JudgeConfig(round_trip_share=1.5)


def test_predictions_in_one_pass_and_caption_to_rgb_in_steps(monkeypatch, token_dir, synth_dir):
    import fourm.generation.api as api
    from fourm.eval.suite import EvalConfig, evaluate
    from fourm.models.build import build_model
    from fourm.tokenizers.tokenizer_set import TokenizerSet

    tok = TokenizerSet.from_pretrained(token_dir.parent / "tok")
    torch.manual_seed(0)
    model = build_model("configs/models/encdec_tiny.yaml", vocab=tok.vocab, overrides=["dim=64"]).eval()
    seen, real = [], api.generate

    def spy(model, tokenizers, inputs, targets, config, *args, **kwargs):
        seen.append((tuple(targets), config.steps, config.temperature, config.top_k, config.cfg_scale, config.choice_temperature, config.schedule))
        return real(model, tokenizers, inputs, targets, config, *args, **kwargs)

    monkeypatch.setattr(api, "generate", spy)
    config = EvalConfig(scenes=4, batch_size=4, steps=3, predict_steps=2, max_len=4, directions=("rgb_to_depth", "rgb_to_semseg", "caption_to_rgb"), rgb_temperature=0.7, rgb_top_k=7, rgb_cfg=3.5, rgb_choice_temperature=1.5)
    report, _ = evaluate(model, tok, synth_dir, config, progress=False)
    # caption -> rgb keeps sampling.TEXT_TO_IMAGE's schedule; the predictions are plain greedy passes
    assert sorted(seen) == [(("depth",), 2, 0.0, 0, 0.0, 0.0, "cosine"), (("rgb",), 3, 0.7, 7, 3.5, 1.5, TEXT_TO_IMAGE["schedule"]), (("semseg",), 2, 0.0, 0, 0.0, 0.0, "cosine")]
    assert {"rgb_to_depth", "rgb_to_semseg"} <= set(report["model"])
    with pytest.raises(ValueError, match="predict_steps"):
        EvalConfig(predict_steps=0)
    for name in ("rgb_cfg", "rgb_temperature", "rgb_top_k", "rgb_choice_temperature"):
        with pytest.raises(ValueError, match=f"{name} must be >= 0"):
            EvalConfig(**{name: -1})
    with pytest.raises(ValueError, match="rgb_cfg must be >= 0, got nan"):
        EvalConfig(rgb_cfg=float("nan"))


def test_train_judge_program_bad_arguments(tmp_path, synth_dir):
    from conftest import assert_usage_error, run_program

    assert_usage_error(run_program("eval/train_judge.py", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "j.safetensors")), "--data")
    assert_usage_error(run_program("eval/train_judge.py", "--data", str(synth_dir), "--out", str(tmp_path / "j.pt")), "expected a .safetensors path")
    assert_usage_error(run_program("eval/train_judge.py", "--data", str(synth_dir), "--out", str(tmp_path / "j.safetensors"), "--round-trip-share", "0.5"), "needs --tokenizers")
    assert_usage_error(run_program("eval/train_judge.py", "--data", str(synth_dir), "--out", str(tmp_path / "j.safetensors"), "--round-trip-share", "2"), "round_trip_share must be in [0, 1]")
    assert not (tmp_path / "j.safetensors").exists()


def test_train_judge_program_writes_a_loadable_judge(tmp_path, synth_dir, token_dir):
    from conftest import run_program
    from fourm.eval.judge import Segmenter, load_segmenter

    out = tmp_path / "judge" / "j.safetensors"
    proc = run_program("eval/train_judge.py", "--data", str(synth_dir), "--tokenizers", str(token_dir.parent / "tok"), "--out", str(out), "--steps", "3", "--round-trip-share", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert isinstance(load_segmenter(out), Segmenter) and "50% of its images the rgb tokenizer's round trips" in proc.stderr

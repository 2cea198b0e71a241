"""`tropd probe`: the statistics on hand-made tensors (closed form), the recommendation rule, and the command end
to end on the shipped toy lab."""

import json
import math

import pytest
import torch

from tropd_cli import cli
from tropd_cli.probe import (
    POSITIONS,
    TokenBatch,
    batch_statistics,
    position_classes,
    recommend,
    rejection_rate,
)

TEXTS = {1: "12", 2: "+", 3: "\n", 4: "answer", 5: ".", 6: " The", 7: "! ", 8: "\n\n"}


def test_position_classes_mark_line_and_sentence_starts():
    responses = [[1, 2, 3, 1, 5, 6, 7, 4], [3, 3, 8, 1]]
    classes = position_classes(responses, TEXTS.__getitem__).tolist()
    line, sentence, other = 0, 1, 2
    assert classes == [line, other, other, line, other, sentence, other, sentence,
                       line, line, line, line]


def test_rejection_is_the_trust_tests_own_statistic():
    reward = torch.tensor([0.5, 0.0, math.log(0.25), -10.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.0, 0.75, 1 - math.exp(-10.0)], dtype=torch.float64)
    assert torch.allclose(rejection_rate(reward, "bernoulli"), expected)
    assert rejection_rate(reward, "hard").tolist() == [0.0, 0.0, 1.0, 1.0]


def hand_made_batch(wrong=(True, False, True)) -> TokenBatch:
    # three responses: [line, other, other], [line, other], [line, sentence, other]
    reward = torch.tensor([math.log(0.5), 0.2, -6.0, 0.0, -0.1, -8.0, math.log(0.5), 1.0])
    position = torch.tensor([0, 2, 2, 0, 2, 0, 1, 2])
    response = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    return TokenBatch(reward, position, response, None if wrong is None else list(wrong))


def test_batch_statistics_in_closed_form():
    stats = batch_statistics(hand_made_batch())
    rejection = stats["rejection"]
    # line starts: r = log 0.5, 0, -8 -> rejections 0.5, 0, 1 - e^-8
    assert rejection["line_start"]["tokens"] == 3
    assert rejection["line_start"]["rejection"] == pytest.approx((0.5 + 1 - math.exp(-8.0)) / 3, abs=1e-6)
    assert rejection["sentence_start"] == {"tokens": 1, "rejection": pytest.approx(0.5, abs=1e-6)}
    # the rest: r = 0.2, -6, -0.1, 1 -> 0, 1 - e^-6, 1 - e^-0.1, 0
    assert rejection["other"]["rejection"] == pytest.approx((2 - math.exp(-6.0) - math.exp(-0.1)) / 4, abs=1e-6)
    assert rejection["all"]["tokens"] == 8
    outliers = stats["outliers"]
    assert outliers["fraction"] == pytest.approx(2 / 8)
    total = 2 * math.log(2) + 0.2 + 6 + 0.1 + 8 + 1
    assert outliers["abs_reward_share"] == pytest.approx(14 / total, abs=1e-6)
    assert outliers["responses_holding"] == 2 and outliers["wrong_share"] == 1.0
    assert stats["wrong_responses"] == pytest.approx(2 / 3, abs=1e-6)
    assert stats["responses"] == 3 and stats["tokens"] == 8
    # only response 1 is correct: its line start (r = 0) and one other token (r = -0.1)
    in_correct = stats["rejection_in_correct_responses"]
    assert in_correct["line_start"] == {"tokens": 1, "rejection": 0.0}
    assert in_correct["sentence_start"] == {"tokens": 0, "rejection": None}
    assert in_correct["other"]["rejection"] == pytest.approx(1 - math.exp(-0.1), abs=1e-6)
    assert in_correct["all"]["tokens"] == 2
    assert stats["reward_quantiles"]["min"] == -8.0 and stats["reward_quantiles"]["max"] == 1.0
    assert stats["reward_quantiles"]["p50"] == pytest.approx(float(torch.tensor(
        [math.log(0.5), 0.2, -6.0, 0.0, -0.1, -8.0, math.log(0.5), 1.0]).double().quantile(0.5)), abs=1e-4)


def test_wrong_share_counts_each_response_once_and_needs_a_grader():
    stats = batch_statistics(hand_made_batch(wrong=(False, False, True)))
    assert stats["outliers"]["wrong_share"] == 0.5  # responses 0 (right) and 2 (wrong) hold an outlier
    ungraded = batch_statistics(hand_made_batch(wrong=None))
    assert ungraded["outliers"]["wrong_share"] is None and ungraded["wrong_responses"] is None
    assert ungraded["rejection_in_correct_responses"] is None
    assert ungraded["responses"] == 3


def test_hard_trust_and_a_class_without_tokens():
    batch = hand_made_batch()
    batch.position = torch.zeros_like(batch.position)
    stats = batch_statistics(batch, trust="hard")
    assert stats["rejection"]["line_start"]["rejection"] == pytest.approx(5 / 8)
    assert stats["rejection"]["sentence_start"] == {"tokens": 0, "rejection": None}
    assert [name for name in stats["rejection"]] == [*POSITIONS, "all"]


def statistics(line=0.02, other=0.01, fraction=0.02, share=0.7, wrong=0.9):
    return {"rejection": {"line_start": {"rejection": line}, "sentence_start": {"rejection": None},
                          "other": {"rejection": other}},
            "outliers": {"threshold": -5.0, "fraction": fraction, "abs_reward_share": share, "wrong_share": wrong}}


def test_a_strong_teacher_and_outliers_on_wrong_responses_recommend_masking():
    advice = recommend(1.0, 0.37, statistics())
    assert (advice.objective, advice.outlier, advice.worth_it, advice.warnings) == ("tropd", "mask", True, [])
    assert "+11.6 +- 2.2" in advice.reason and "90% of the responses holding one are wrong" in advice.reason


def test_a_teacher_not_clearly_above_the_student_is_not_worth_it():
    advice = recommend(0.88, 0.80, statistics())
    assert (advice.objective, advice.outlier, advice.worth_it) == ("opd", None, False)
    assert advice.reason.startswith("teacher 88% is not clearly above student 80%")
    assert recommend(0.61, 0.50, statistics()).worth_it and not recommend(0.59, 0.50, statistics()).worth_it


def test_outliers_on_correct_responses_or_too_light_recommend_opd():
    spread = recommend(1.0, 0.4, statistics(wrong=0.5))
    assert (spread.objective, spread.worth_it) == ("opd", True) and "(style)" in spread.reason
    light = recommend(1.0, 0.4, statistics(share=0.3))
    assert light.objective == "opd" and "too few to dominate" in light.reason
    none = recommend(1.0, 0.4, statistics(fraction=0.0, share=0.0, wrong=None))
    assert none.objective == "opd"


def test_line_start_rejection_warns_of_a_style_mismatch():
    advice = recommend(1.0, 0.4, statistics(line=0.4, other=0.05))
    assert advice.warnings == ["the trust test rejects 40% of the line-start tokens (5% elsewhere): teacher and "
                               "student start lines differently (style, not error)"]
    assert recommend(1.0, 0.4, statistics(line=0.4, other=0.3)).warnings == []  # no worse than the rest
    # graded: correct responses decide, since rejecting an error is what the test is for
    errors_only = {**statistics(line=0.4, other=0.05), "rejection_in_correct_responses": statistics(line=0.05)[
        "rejection"]}
    assert recommend(1.0, 0.4, errors_only).warnings == []
    style = {**statistics(line=0.05), "rejection_in_correct_responses": statistics(line=0.3, other=0.02)["rejection"]}
    assert recommend(1.0, 0.4, style).warnings == ["the trust test rejects 30% of the line-start tokens of correct "
                                                   "responses (2% elsewhere): teacher and student start lines "
                                                   "differently (style, not error)"]


def test_without_a_grader_the_rewards_decide_and_it_says_so():
    advice = recommend(None, None, statistics(wrong=None))
    assert advice.objective == "tropd" and advice.warnings[-1].startswith("no grader")


def run_probe(capsys, tmp_path, *argv):
    out = tmp_path / "probe.json"
    code = cli.main(["probe", *argv, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    return json.loads(out.read_text()), captured.out


def test_probe_on_the_v1_pair(capsys, tmp_path):
    report, printed = run_probe(capsys, tmp_path, "--preset", "toylab", "--prompts", "8")
    assert report["benchmark"]["problems"] == 8 and report["responses"] == 8 * 4
    assert report["sampling"] == {"samples_per_prompt": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48,
                                  "seed": 0}
    assert report["rejection"]["all"]["tokens"] == report["tokens"] == sum(
        row["tokens"] for name, row in report["rejection"].items() if name != "all")
    advice = recommend(report["accuracy"]["teacher"], report["accuracy"]["student"], report)
    assert report["recommendation"]["objective"] == advice.objective and advice.reason in printed.replace("\n", " ")
    assert "trust test (bernoulli):" in printed and "line start" in printed and "sentence start" in printed


def test_probe_on_v3_reproduces_the_manifests_gates(capsys, tmp_path):
    from tropd_cli.models import TOYLAB_ASSETS

    manifest = json.loads((TOYLAB_ASSETS / "manifest-v3.json").read_text())
    report, _ = run_probe(capsys, tmp_path, "--preset", "toylab-v3", "--prompts",
                          str(manifest["gate_samples"]["prompts"]))
    main = manifest["informational"]["v3-teacher/v3-student"]
    for key in ("tokens", "responses", "rejection", "rejection_in_correct_responses", "reward_quantiles", "outliers",
                "wrong_responses"):
        assert report[key] == main[key], key
    assert report["outliers"]["fraction"] == manifest["gates"]["outlier_token_fraction"]["value"]


@pytest.mark.parametrize(("argv", "message"), [
    (["probe", "--preset", "nope"], "error: unknown preset 'nope'; known presets:"),
    (["probe", "--preset", "toylab", "--set", "teacher.backend=server", "--set", "teacher.url=http://127.0.0.1:9"],
     "error: tropd probe scores with the teacher loaded here; teacher.backend=server is not supported"),
    (["probe", "--preset", "toylab", "--set", "student.model=toylab:nobody"], "error: unknown toy-lab model"),
])
def test_probe_bad_input_is_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err

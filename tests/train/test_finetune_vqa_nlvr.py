"""VQA and NLVR2 fine-tuning end to end on the CPU through ``blip-fast finetune`` and ``blip-fast eval``: the tiny
BLIP pretrained a few steps on the built-in scenes, then fine-tuned from that checkpoint on the synthetic VQA set
(questions about the drawn scenes, ten answers each) and the synthetic NLVR2 set (statements about pairs of scenes),
then evaluated on their held-out splits.

The bars: VQA accuracy (rank inference over the answer list) at least 1.5 times that of always giving the most
common training answer; NLVR2 accuracy at least 7 points above the majority class of the evaluated statements (the
tiny model learns these compositional statements slowly: 3,200 training pairs, 1,000 steps). Seen (2-core CPU,
torch 2.13, 2026-12-05): VQA accuracy 39.6 after 126 steps against 20.0 for always answering "no"; NLVR2 test
accuracy 60.5 against a majority class of 50.5.
"""

import json
from collections import Counter

import pytest

from blip_fast.cli import main
from blip_fast.data.synth_tasks import write_task_dataset
from blip_fast.evaluation.vqa_accuracy import evaluate_vqa as vqa_accuracy
from blip_fast.train.config import load_pretrain_config
from blip_fast.train.pretraining import pretrain

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    config = load_pretrain_config(None, ["data.synthetic_n=800", "train.max_steps=10", f"train.out={out}",
                                         "train.eval_size=0", "train.tensorboard=false"])
    return pretrain(config, printer=lambda line: None).checkpoint


COMMON = ["--config", "tiny-synthetic", "data.kind=json", "optim.schedule=cosine", "optim.warmup_steps=0",
          "optim.init_lr=5e-4", "optim.min_lr=0", "train.tensorboard=false", "train.log_every=50"]


def test_pretrain_then_finetune_vqa_then_evaluate(pretrained, tmp_path, capsys):
    data = tmp_path / "vqa"
    write_task_dataset(data, "vqa", 300, image_size=64)
    out = tmp_path / "finetune"
    status = main(["finetune", "vqa", *COMMON, f"data.paths=[{data / 'vqa_train.json'}]", f"data.image_root={data}",
                   f"data.eval_path={data / 'vqa_test_answers.json'}", f"data.answer_list={data / 'answer_list.json'}",
                   f"train.init_from={pretrained}", "train.epochs=3", f"train.out={out}", "train.eval_size=150"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"initialised the vqa model from the pretrain checkpoint {pretrained}" in printed
    evaluation = json.loads((out / "summary.json").read_text())["evaluation"]
    accuracy = evaluation["metrics"]["accuracy"]
    answers = json.loads((out / "vqa_answers.json").read_text())
    assert len(answers) == 150 and set(answers[0]) == {"question_id", "answer"}
    # the baseline: the most common training answer for every question
    train = json.loads((data / "vqa_train.json").read_text())
    common = Counter(answer for entry in train for answer in entry["answer"]).most_common(1)[0][0]
    truth = {e["question_id"]: e["answer"] for e in json.loads((data / "vqa_test_answers.json").read_text())[:150]}
    baseline = vqa_accuracy({qid: common for qid in truth}, truth).overall
    assert accuracy >= 1.5 * baseline, (accuracy, baseline)
    # the CLI evaluation of the final checkpoint gives the run's accuracy
    status = main(["eval", "vqa", "-c", json.loads((out / "summary.json").read_text())["checkpoint"], "--questions",
                   str(data / "vqa_test_answers.json"), "--image-root", str(data), "--answer-list",
                   str(data / "answer_list.json"), "--limit", "150", "--json", str(tmp_path / "m.json")])
    assert status == 0
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == pytest.approx(accuracy)


def test_vqa_refuses_to_evaluate_on_questions_it_trains_on(pretrained, tmp_path, capsys):
    data = tmp_path / "vqa"
    write_task_dataset(data, "vqa", 20, image_size=64)
    status = main(["finetune", "vqa", *COMMON, f"data.paths=[{data / 'vqa_train.json'}]", f"data.image_root={data}",
                   f"data.eval_path={data / 'vqa_train.json'}", f"data.answer_list={data / 'answer_list.json'}",
                   f"train.out={tmp_path / 'out'}"])
    assert status == 2
    assert "vqa_train.json" in capsys.readouterr().err


def test_pretrain_then_finetune_nlvr_then_evaluate(pretrained, tmp_path, capsys):
    data = tmp_path / "nlvr"
    write_task_dataset(data, "nlvr", 4000, image_size=64)
    out = tmp_path / "finetune"
    status = main(["finetune", "nlvr", *COMMON, f"data.paths=[{data / 'nlvr_train.json'}]", f"data.image_root={data}",
                   f"data.val_path={data / 'nlvr_dev.json'}", f"data.eval_path={data / 'nlvr_test.json'}",
                   f"train.init_from={pretrained}", "train.epochs=10", f"train.out={out}", "optim.init_lr=1e-3",
                   "train.eval_size=200"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"initialised the nlvr model from the pretrain checkpoint {pretrained}" in printed
    metrics = json.loads((out / "summary.json").read_text())["evaluation"]["metrics"]
    assert metrics["accuracy"] >= metrics["majority_class"] + 7, metrics
    assert (out / "best.pth").is_file()

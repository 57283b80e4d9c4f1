"""What a run says about itself matches the algorithm it ran (issue 31): the KL it logs is the one it trains with
(GRPO's k3 loss term and critic_free.kl_coef, not PPO's k1 and beta), value metrics only with a critic, each
reward-shaping step as its own metric, and the model card, the start-up line, the progress bar and ``--help``
name that algorithm's settings and none of PPO's. The rollouts are test_wiring's hand-built four samples."""
import math

import pytest
import torch
from helpers import tiny_config
from test_wiring import ENDED, MASK, OLD, RAW, REF, experience_of, trainer_for


def seq_kl(estimator: str) -> float:
    """The mean over the four samples of the summed per-token KL, written from Schulman's estimators."""
    total = 0.0
    for b in range(4):
        for t in range(3):
            if MASK[b][t]:
                lr = OLD[b][t] - REF[b][t]  # log pi_old - log pi_ref
                total += lr if estimator == "k1" else math.exp(-lr) - 1 + lr
    return total / 4


def test_the_hand_built_rollout_has_a_negative_k1_kl():
    """The issue's symptom needs a batch whose k1 estimate is negative; k3 of the same batch is not."""
    assert seq_kl("k1") == pytest.approx(-0.075) and seq_kl("k3") > 0


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "gspo", "cispo", "sapo"])
def test_a_grpo_family_step_logs_its_k3_loss_kl_and_its_own_coefficient(tiny_model_dir, tmp_path, algorithm):
    """GRPO showed PPO's k1 (negative here) and ppo.init_kl_coef (0.05) though its loss uses k3 x
    critic_free.kl_coef (0.07 here), and a value/mean of 0 without a critic."""
    trainer = trainer_for(tiny_model_dir, tmp_path, algorithm, "ppo.init_kl_coef=0.05", "ppo.kl_estimator=k1")
    _, stats = experience_of(trainer)
    assert stats["objective/kl"] == pytest.approx(seq_kl("k3"), rel=1e-5) and stats["objective/kl"] >= 0
    assert stats["objective/kl_coef"] == 0.07
    assert not [k for k in stats if k.startswith("value/")]
    assert "objective/non_score_reward" not in stats and "info/kl_ref" not in stats  # the KL is not in the reward


@pytest.mark.parametrize("algorithm,extra", [("dapo", ()), ("grpo", ("critic_free.kl_coef=0",))])
def test_without_a_kl_term_the_kl_is_logged_for_information_with_no_coefficient(tiny_model_dir, tmp_path,
                                                                               algorithm, extra):
    trainer = trainer_for(tiny_model_dir, tmp_path, algorithm, *extra)
    _, stats = experience_of(trainer)
    assert stats["info/kl_ref"] == pytest.approx(seq_kl("k3"), rel=1e-5)
    assert "objective/kl" not in stats and "objective/kl_coef" not in stats
    assert trainer.progress(stats) == {"reward": f"{stats['reward/mean']:.3f}", "kl": f"{seq_kl('k3'):.3f}"}


@pytest.mark.parametrize("algorithm,critic", [("ppo", True), ("rloo", False), ("reinforce", False)])
def test_a_kl_in_the_reward_keeps_ppos_estimator_and_the_controllers_beta(tiny_model_dir, tmp_path, algorithm,
                                                                         critic):
    trainer = trainer_for(tiny_model_dir, tmp_path, algorithm, "ppo.init_kl_coef=0.2", "ppo.kl_estimator=k1")
    _, stats = experience_of(trainer)
    assert stats["objective/kl"] == pytest.approx(seq_kl("k1"), rel=1e-5)
    assert stats["objective/kl_coef"] == pytest.approx(0.2)
    assert stats["objective/non_score_reward"] == pytest.approx(-0.2 * seq_kl("k1"), rel=1e-5)
    assert ("value/mean" in stats) == critic


def test_each_reward_shaping_step_is_its_own_metric(tiny_model_dir, tmp_path):
    """The issue: reward/mean -0.43 beside the user's +0.197, with nothing to say why. Raw [0.6, 3.0, -0.4, 12.0];
    samples 1 and 3 have no EOS (- 0.5 each); 12.0 - 0.5 = 11.5 is clipped to 10."""
    trainer = trainer_for(tiny_model_dir, tmp_path, "grpo", "generation.missing_eos_penalty=0.5", "reward.clip=10")
    _, stats = experience_of(trainer)
    assert stats["reward/raw_mean"] == pytest.approx(sum(RAW) / 4)
    assert stats["reward/eos_penalized"] == pytest.approx(sum(not e for e in ENDED) / 4)  # 2 of 4
    assert stats["reward/eos_penalty"] == pytest.approx(0.5 * 2 / 4)
    assert stats["reward/clipped"] == pytest.approx(1 / 4)
    # the steps add up: raw mean - the penalty's mean - what the clip took (1.5 of one sample, over 4)
    assert stats["reward/mean"] == pytest.approx(stats["reward/raw_mean"] - stats["reward/eos_penalty"] - 1.5 / 4)
    assert stats["reward/raw_std"] == pytest.approx(torch.tensor(RAW).std().item(), rel=1e-5)
    assert "reward/normalized_mean" not in stats  # reward.normalize: none


def test_shaping_metrics_count_only_scored_samples_and_appear_only_when_on(tiny_model_dir, tmp_path):
    trainer = trainer_for(tiny_model_dir, tmp_path / "a", "grpo", "generation.missing_eos_penalty=0.5",
                          "reward.clip=10", "reward.on_error=skip")
    _, stats = experience_of(trainer, valid=(True, True, False, False))  # the clipped sample 3 was skipped
    assert stats["reward/eos_penalized"] == pytest.approx(1 / 2) and stats["reward/clipped"] == 0.0
    trainer = trainer_for(tiny_model_dir, tmp_path / "b", "grpo", "generation.missing_eos_penalty=null",
                          "reward.clip=null", "reward.normalize=running")
    _, stats = experience_of(trainer)
    assert "reward/eos_penalty" not in stats and "reward/clipped" not in stats
    assert stats["reward/normalized_mean"] == pytest.approx(0.0, abs=1e-5)  # normalised by this batch alone


def config_of(tiny_model_dir, tmp_path, algorithm, *extra):
    gens = [] if algorithm in ("ppo", "dpo", "kto") else ["critic_free.num_generations=4"]
    return tiny_config(tiny_model_dir, tmp_path / "run", f"algorithm={algorithm}", *gens, *extra,
                       *(["dpo.data=pairs.jsonl"] if algorithm == "dpo" else []))


PPO_ONLY = ("vf_coef", "gamma", "lam", "clip_range_value", "init_kl_coef", "adaptive", "kl_target", "ppo.critic")


@pytest.mark.parametrize("algorithm,own", [
    ("grpo", ["critic_free.num_generations=4", "ppo.clip_range=0.2", "critic_free.scale=group",
              "a loss term: critic_free.kl_coef=0.04 x k3"]),
    ("dr_grpo", ["critic_free.num_generations=4", "train.loss_aggregation=token_sum", "critic_free.kl_coef=0.04"]),
    ("dapo", ["critic_free.clip_range_high=0.28", "ppo.clip_range=0.2", "none in the loss"]),
    ("gspo", ["critic_free.sequence_clip_low=0.0003", "critic_free.sequence_clip_high=0.0004",
              "critic_free.kl_coef=0.04"]),
    ("cispo", ["critic_free.clip_range_high=0.28", "critic_free.kl_coef=0.04"]),
    ("sapo", ["critic_free.sapo_tau_pos=1.0", "critic_free.sapo_tau_neg=1.05", "critic_free.kl_coef=0.04"]),
    ("dpo", ["dpo.beta=0.1", "dpo.loss=sigmoid", "DPO's implicit KL"]),
    ("kto", ["kto.beta=0.1", "kto.desirable_weight=1.0", "kto.undesirable_weight=1.0", "KTO's reference point"]),
])
def test_the_model_card_lists_the_algorithms_settings_and_none_of_ppos(tiny_model_dir, tmp_path, algorithm, own):
    """A GRPO card listed vf_coef, gamma, lam, init_kl_coef, adaptive and target, and omitted num_generations and
    critic_free.kl_coef."""
    from llmrl.distributed.checkpoint import COMPLETE_MARK
    from llmrl.exporter import model_card

    cfg = config_of(tiny_model_dir, tmp_path, algorithm)
    checkpoint = tmp_path / "run" / "final"
    checkpoint.mkdir(parents=True)
    torch.save({"step": 3, "kl_ctl": {"value": 0.05}}, checkpoint / COMPLETE_MARK)
    card = model_card(cfg, checkpoint, "fp32", 0.0, 1e-3)
    assert f"| {algorithm} settings | " in card
    for text in own:
        assert text in card, (text, card)
    for word in PPO_ONLY + ("final beta", "PPO"):
        assert word not in card, (word, card)
    clip = "ppo.clip_range="
    assert (clip in card) == (algorithm in ("grpo", "dr_grpo", "dapo"))  # GSPO, CISPO, SAPO read no token clip


@pytest.mark.parametrize("algorithm,setting,named", [
    ("kto", "kto.desirable_share=0.5", ["kto.desirable_share=0.5"]),
    ("ilql", "ilql.positive_share=0.25", ["ilql.positive_share=0.25", "ilql.positive_reward=0.5"]),
])
def test_an_offline_batch_share_is_named_when_set_and_only_then(tiny_model_dir, tmp_path, algorithm, setting, named):
    from llmrl.algorithms import describe

    data = ["ilql.data=logged.jsonl"] if algorithm == "ilql" else []
    with_share = dict(describe(config_of(tiny_model_dir, tmp_path, algorithm, *data, setting)))[algorithm]
    without = dict(describe(config_of(tiny_model_dir, tmp_path, algorithm, *data)))[algorithm]
    assert all(text in with_share for text in named), with_share
    assert "_share" not in without and "positive_reward" not in without, without


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_a_card_with_the_kl_in_the_reward_shows_the_controller(tiny_model_dir, tmp_path, algorithm):
    from llmrl.distributed.checkpoint import COMPLETE_MARK
    from llmrl.exporter import model_card

    cfg = config_of(tiny_model_dir, tmp_path, algorithm, "ppo.init_kl_coef=0.03")
    checkpoint = tmp_path / "run" / "final"
    checkpoint.mkdir(parents=True)
    torch.save({"step": 3, "kl_ctl": {"value": 0.0417}}, checkpoint / COMPLETE_MARK)
    card = model_card(cfg, checkpoint, "fp32", 0.0, 1e-3)
    assert "| KL | in the reward: -beta x k1 per token, beta from ppo.init_kl_coef=0.03, adaptive towards " \
           "ppo.kl_target=6.0 over ppo.kl_horizon=10000; final beta=0.0417 |" in card
    assert ("ppo.vf_coef=" in card and "ppo.gamma=" in card) == (algorithm == "ppo")
    assert "critic_free.num_generations=4" in card if algorithm == "rloo" else "critic_free" not in card


def test_the_start_up_line_and_the_bar_name_the_algorithm_and_its_settings(tiny_model_dir, tmp_path, capsys):
    """The bar said ppo: for GRPO runs once; the first line lists GRPO's settings, none of PPO's."""
    from helpers import make_trainer

    from llmrl.algorithms import describe
    from llmrl.tracking import MetricsLogger

    cfg = config_of(tiny_model_dir, tmp_path, "grpo", "train.total_steps=1", "train.epochs=1", "train.rollout_batch_size=8",
                    "train.mini_batch_size=8", "train.micro_batch_size=8", "data.eval_size=4", "run.progress=true")
    trainer = make_trainer(cfg)
    logger = MetricsLogger(tmp_path / "run", enabled=True)
    try:
        trainer.run(logger, trainer.eval_rows)
    finally:
        logger.close()
    out, err = capsys.readouterr()
    first = out.splitlines()[0]
    assert first == "; ".join(f"{label}: {text}" for label, text in describe(cfg))
    assert first.startswith("grpo: critic_free.num_generations=4") and "critic_free.kl_coef=0.04 x k3" in first
    assert not [word for word in PPO_ONLY if word in first]
    bar = [line for line in err.replace("\r", "\n").splitlines() if "it/s, reward=" in line]  # the training bar
    assert bar and all(line.startswith("grpo: ") for line in bar), bar


def test_train_help_names_every_algorithm_not_ppo_alone(capsys):
    from llmrl.algorithms import ESTIMATORS
    from llmrl.cli.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with the config's algorithm" in text and "with PPO" not in text
    for name in [*ESTIMATORS, "dpo", "kto"]:
        assert name in text


def test_the_plot_is_titled_with_the_algorithm_run(tmp_path):
    import json

    import yaml

    from llmrl.cli.plot import plot_run, run_algorithm

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    assert run_algorithm(run) is None
    (run / "final" / "config.yaml").write_text(yaml.safe_dump({"algorithm": "dapo"}))
    assert run_algorithm(run) == "dapo"
    rows = [{"step": s, "reward/mean": -0.4, "reward/raw_mean": 0.2, "reward/eos_penalty": 0.3,
             "reward/eos_penalized": 0.6, "reward/clipped": 0.0, "info/kl_ref": 0.01 * s} for s in (1, 2)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_run(run).is_file()

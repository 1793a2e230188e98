from pathlib import Path

import pytest

from securefpt.errors import ConfigError
from securefpt.experiment.loading import load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["fl.rounds=3", "fl.lr=0.01", "data.languages=[eng, yor]", "dp.enabled=true"])
    assert cfg.fl.rounds == 3 and cfg.fl.lr == pytest.approx(0.01)
    assert cfg.data.languages == ["eng", "yor"]
    assert cfg.dp.enabled is True
    assert cfg.peft.method == "prompt_tuning" and cfg.paradigm == "federated"


def test_unknown_key_names_file_and_field(tmp_path):
    path = write(tmp_path, "fl:\n  roundz: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value) and "fl.roundz" in str(exc.value) and "unknown key" in str(exc.value)


def test_wrong_type_names_field(tmp_path):
    path = write(tmp_path, "fl:\n  rounds: many\n")
    with pytest.raises(ConfigError, match=r"fl\.rounds"):
        load_config(path)


def test_wrong_choice_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"peft\.method"):
        load_config(write(tmp_path, "peft:\n  method: adapters\n"))


def test_each_peft_method_is_its_own_type_with_only_its_own_settings(tmp_path):
    """PEFT's shape: a method's section names only that method's settings; a setting of another
    method is refused by name, in the operator's file and in a request a node receives."""
    from pydantic import ValidationError

    from securefpt.protocol.request import ExperimentRequest, Lora, PromptTuning, PTuning

    assert isinstance(load_config(None).peft, PromptTuning)  # the default, with no method named
    lora = load_config(write(tmp_path, "peft:\n  method: lora\n  lora_r: 4\n"))
    assert isinstance(lora.peft, Lora) and lora.peft.lora_r == 4
    with pytest.raises(ConfigError, match=r"peft\.num_virtual_tokens: not a setting of peft\.method=lora"):
        load_config(write(tmp_path, "peft:\n  method: lora\n  num_virtual_tokens: 8\n"))
    with pytest.raises(ConfigError, match=r"--set: peft\.lora_r: not a setting of peft\.method=prompt_tuning"):
        load_config(None, ["peft.lora_r=4"])
    # switching a file's method with --set keeps the settings the new method has, drops the others
    base = write(tmp_path, "peft:\n  method: prompt_tuning\n  num_virtual_tokens: 4\n  prompt_init: random\n")
    assert load_config(base, ["peft.method=p_tuning"]).peft == PTuning(method="p_tuning", num_virtual_tokens=4)
    assert load_config(base, ["peft.method=lora", "peft.lora_r=2"]).peft == Lora(method="lora", lora_r=2)
    with pytest.raises(ConfigError, match=r"peft\.lora_rank: not a setting of peft\.method=lora"):
        load_config(base, ["peft.method=lora", "peft.lora_rank=4"])  # a misspelt key survives the switch
    with pytest.raises(ConfigError, match=r"--set: peft: Input should be a valid dictionary"):
        load_config(None, ["peft=5"])
    # a request no node would accept is one line for the operator, not a validation traceback
    with pytest.raises(ConfigError, match="the request to the nodes: labels: at least 2 distinct labels"):
        load_config(None).request(["only-one"])
    # a request on the wire is the same tagged union: a stray setting is refused by the node's parser
    wire = load_config(None, ["peft.method=lora"]).request(["a", "b"]).model_dump(mode="json")
    wire["peft"]["num_virtual_tokens"] = 64
    with pytest.raises(ValidationError, match="num_virtual_tokens"):
        ExperimentRequest.model_validate(wire)


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"malformed YAML \(line"):
        load_config(write(tmp_path, "fl: [unclosed\n  rounds: 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_source_requirements(tmp_path):
    with pytest.raises(ConfigError, match="data: root is required for source=masakhanews_tsv"):
        load_config(write(tmp_path, "data:\n  source: masakhanews_tsv\n"))
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(None, ["data.languages=[eng, eng]"])


def test_relative_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "exp.yaml"
    path.write_text("data:\n  source: csv\n  root: ../mydata\n", encoding="utf-8")
    assert load_config(path).data.root == (tmp_path / "mydata").resolve()


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["fl.rounds"])


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "name: *i\n"


def _loaders():
    from securefpt.node.config import load_node
    from securefpt.protocol.policy import load_policy
    from securefpt.study.config import load_study

    return {"experiment": load_config, "policy": load_policy, "node": load_node, "study": load_study}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["experiment", "policy", "node", "study"])
def test_a_yaml_alias_bomb_is_refused_before_anything_walks_it(tmp_path, kind):
    """A few hundred bytes whose aliases expand to 9^9 (387 million) nodes: every YAML securefpt reads
    refuses it with one line, instead of expanding it into memory."""
    path = write(tmp_path, ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 400
    with pytest.raises(ConfigError) as err:
        _loaders()[kind](path)
    assert "aliases expand to more than" in str(err.value) and "\n" not in str(err.value)


def test_a_few_honest_aliases_still_load(tmp_path):
    path = write(tmp_path, "seed: &three 3\nname: aliased\nfl: {rounds: *three}\n")
    assert load_config(path).fl.rounds == 3 and load_config(path).name == "aliased"


def test_the_config_reference_is_the_schemas_and_names_every_key_with_why():
    """docs/config-reference.md equals what the schema generates (regenerate: python -m
    securefpt.config_reference > docs/config-reference.md), and every key of every section has a why."""
    from pathlib import Path

    from securefpt.config_reference import reference_markdown

    text = reference_markdown()
    assert (Path(__file__).resolve().parents[1] / "docs" / "config-reference.md").read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert {"`fl.rounds`", "`dp.target_epsilon`", "`secagg.min_cohort`", "`data.hf.text_field`",
            "`data.per_language.<language>.max_train`", "`fl.server_optimizer.lr`"} <= \
        {row.split(" | ")[0].removeprefix("| ") for row in rows}
    assert all(row.rstrip(" |").split(" | ")[-1].strip() for row in rows)  # no key without its why

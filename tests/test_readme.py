"""The README's two set-up commands are the ones the project actually uses."""
from pathlib import Path
import re

REPO = Path(__file__).resolve().parents[1]


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)


def test_readme_test_command_is_what_ci_runs():
    ci_last = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert bash_blocks()[1].strip() == ci_last.strip()


def test_readme_main_command_runs_the_quick_experiment():
    main = bash_blocks()[0]
    assert "pip install -e ." in main
    assert "ticketsmith.prune --config configs/imp_mnist.yaml" in main
    assert (REPO / "configs" / "imp_mnist.yaml").is_file()

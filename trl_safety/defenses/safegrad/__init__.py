"""SafeGrad (fine-tuning stage): project the user gradient away from a conflicting alignment gradient."""

from ...registry import DefenseSpec, register_defense
from .safegrad_config import SafeGradConfig
from .safegrad_trainer import SafeGradTrainer, kl_to_reference, project_conflicting


_CITATION = """\
@article{yi2025safegrad,
    title   = {{SafeGrad: Gradient Surgery for Safe LLM Fine-Tuning}},
    author  = {Biao Yi and Jiahao Li and Baolei Zhang and Lihai Nie and Tong Li and Tiansheng Huang and Zheli Liu},
    journal = {arXiv preprint arXiv:2508.07172},
    year    = {2025},
}"""


register_defense(
    DefenseSpec(
        name="safegrad",
        stage="fine-tuning",
        config_class=SafeGradConfig,
        trainer_class=SafeGradTrainer,
        title="SafeGrad",
        paper={
            "title": "SafeGrad: Gradient Surgery for Safe LLM Fine-Tuning",
            "id": "2508.07172",
            "citation": _CITATION,
        },
        description="Fine-tuning whose step gradient is projected away from a conflicting KL alignment gradient.",
        bench_overrides={},
        neutral_overrides={"project_gradients": False, "alignment_weight": 0.0},
    )
)

__all__ = ["SafeGradConfig", "SafeGradTrainer", "kl_to_reference", "project_conflicting"]

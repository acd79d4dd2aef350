"""Review of planning against nnU-Net v2's experiment planner (session 27X)."""

from helpers import synthetic_fingerprint

from medseg.config import PlanConfig
from medseg.plan import Plan, make_plan


def test_a_target_spacing_coarser_than_the_cases_makes_a_readable_plan():
    # one 3 mm slice (a 2D-like case) planned at 8 mm: the median shape rounded to 0 along
    # that axis, and the plan.json train wrote was refused by predict and --resume
    fp = synthetic_fingerprint([[0.8, 0.8, 3.0]] * 3, [[200, 180, 1]] * 3)
    plan = make_plan(fp, PlanConfig(target_spacing=[0.8, 0.8, 8.0]))
    assert plan.median_shape == [200, 180, 1]
    assert Plan.from_json(plan.to_json()) == plan

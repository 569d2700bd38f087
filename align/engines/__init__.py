from align.rollout import *  # noqa: F401,F403  TEMPORARY shim until the engines package lands
from align.rollout import make_engine, vllm_available  # noqa: F401

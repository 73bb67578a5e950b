import os
import random

import pytest
import torch

import calibfast

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return (f"calibfast {calibfast.__version__}: native kernels {calibfast.native_backends()}, "
            f"cpu capability {calibfast.cpu_capability()}, torch {torch.__version__}, "
            f"CALIBFAST_REQUIRE_NATIVE={os.environ.get('CALIBFAST_REQUIRE_NATIVE', '')}")


def native_on(device):
    return calibfast.native_backends().get(torch.device(device).type, False)

import keras
import pytest


def pytest_report_header(config):
    return f"keras backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.utils.set_random_seed(1234)
    yield
    # free_memory=False skips a gc.collect() that costs ~0.5 s a test once
    # torch and transformers are imported.
    keras.backend.clear_session(free_memory=False)

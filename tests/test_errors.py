import pickle

import pytest

import sisa.errors as errors


@pytest.mark.parametrize("cls", [getattr(errors, n) for n in dir(errors) if n.endswith("Error")])
def test_errors_survive_pickling(cls: type[Exception]) -> None:
    err = pickle.loads(pickle.dumps(cls("shard 3: something went wrong")))
    assert type(err) is cls and str(err) == "shard 3: something went wrong"
    assert isinstance(err, errors.SisaError)

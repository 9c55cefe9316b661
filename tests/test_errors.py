"""sisa's errors cross a real Ray process boundary as themselves: a caller catches the type it knows."""

import pytest

import sisa.errors as errors

NAMES = sorted(n for n in dir(errors) if n.endswith("Error"))


@pytest.mark.usefixtures("ray_session")
def test_errors_raised_in_a_ray_worker_reach_the_driver_as_their_own_type() -> None:
    """Ray pickles a task's exception in the worker and rebuilds it in the driver.

    An error class whose constructor no longer takes one message (or that cannot be pickled)
    arrives as a bare ``RayTaskError`` and escapes ``except DataError``-style handlers.
    """
    import ray

    @ray.remote(max_retries=0)
    def fail(name: str) -> None:
        raise getattr(errors, name)(f"{name}: shard 3 went wrong")

    refs = {name: fail.remote(name) for name in NAMES}
    for name, ref in refs.items():
        cls = getattr(errors, name)
        with pytest.raises(cls) as caught:
            ray.get(ref)
        assert isinstance(caught.value, errors.SisaError), name
        assert f"{name}: shard 3 went wrong" in str(caught.value)

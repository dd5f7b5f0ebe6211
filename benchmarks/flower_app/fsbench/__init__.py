"""Flower App of the round benchmark: FedAvg over P float32 parameters, clients that echo the weights."""

N_ARRAYS = 4


def layout(num_params: int, n_arrays: int = N_ARRAYS) -> list[int]:
    """Array lengths: ``num_params`` over ``n_arrays`` 1-d arrays (as ``benchmarks/rounds_plan.layout``)."""
    size, rest = divmod(num_params, n_arrays)
    return [size + (rest if i == 0 else 0) for i in range(n_arrays)]

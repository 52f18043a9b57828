"""Reading traced programs in tests: what XLA would be handed, before it rewrites anything."""

import jax


def equations(jaxpr, primitive: str) -> list:
    """Every `primitive` equation of a jaxpr, nested calls (custom_vjp, pjit, scan) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(eqn)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found.extend(equations(sub, primitive))
    return found


def assert_bf16_operands_float32_accumulation(fn, args, primitive: str, count: int) -> None:
    """`fn(*args)` traces to `count` `primitive` equations, each with bfloat16 operands and a
    float32 result: checked on the program because XLA:CPU upcasts bf16 anyway, so numbers
    alone could not tell a float32 accumulation from a bf16 one."""
    eqns = equations(jax.make_jaxpr(fn)(*args).jaxpr, primitive)
    assert len(eqns) == count, eqns
    for eqn in eqns:
        assert [v.aval.dtype for v in eqn.invars] == [jax.numpy.bfloat16] * 2, eqn
        assert eqn.params["preferred_element_type"] == jax.numpy.float32, eqn

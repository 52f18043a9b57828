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

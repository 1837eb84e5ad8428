"""Two-party computation on additive secret shares: the primitives of a body computed by two non-colluding servers.

Modules, bottom to top: ``ring`` (fixed point in int64, wrap-around), ``party`` (a party, the messages it opens,
rounds and bytes counted; an in-process pair for tests), ``shares`` (sharing, reconstruction, local linear
operations), ``beaver`` (the device as dealer of triples; products of two shared tensors; truncation),
``binary`` (XOR-shared bit vectors: AND, a Kogge-Stone adder, A2B, B2A of a bit), ``compare`` (sign, less-than,
select, ReLU, row maximum), ``functions`` (exp, reciprocal, rsqrt, softmax with its own maximum, SiLU), ``ops``
(what a decoder layer needs, in float64 or on shares), ``layer`` (a Llama layer stated once over ``ops``), ``body``
(``SharedBody``: one party's body with its KV shares per session; the device's share/reconstruct; both parties in
one process).
Protocols follow CrypTen's (Knott et al., NeurIPS 2021); the parameters come from measured SmolLM2 ranges
(docs/secret-sharing.md, benchmarks/mpc_ranges.py; costs: benchmarks/mpc_costs.py).
"""

"""The body computed by two non-colluding servers on additive secret shares; the device shares and deals.

Modules, bottom to top: ``ring`` (fixed point in int64, wrap-around; the AES-CTR streams), ``party`` (a party,
the messages it opens, rounds and bytes counted; an in-process pair for tests), ``shares`` (sharing,
reconstruction, local linear operations, truncation), ``dealing`` (the device as dealer: seeded streams, party
1's corrections), ``beaver`` (products of two shared tensors), ``binary`` (XOR-shared bit vectors: AND, a
Kogge-Stone adder, A2B, B2A of a bit), ``compare`` (sign, less-than, select, ReLU, row maximum), ``functions``
(exp, reciprocal, rsqrt, softmax with its own maximum, SiLU), ``ops`` (what a decoder layer needs, in float64
or on shares), ``layer`` (a Llama layer stated once over ``ops``), ``body`` (``SharedBody``: one party's body with
its KV shares per session; the device's share/reconstruct; both parties in one process), ``peer`` (the servers'
TCP link), ``messages`` (the device's protocol), ``server`` (``ShareServer``: ``lambdasplit serve --share``),
``device`` (``SecretSharedLink``: ``generate --secret-shared``).
Protocols follow CrypTen's (Knott et al., NeurIPS 2021); the parameters come from measured SmolLM2 ranges
(docs/secret-sharing.md, benchmarks/mpc_ranges.py; costs: benchmarks/mpc_costs.py, benchmarks/mpc_network.py).
"""

from lambdasplit.mpc.body import BodyWeights, SharedBody, TwoPartyBody
from lambdasplit.mpc.device import SecretSharedLink
from lambdasplit.mpc.server import ShareServer

__all__ = ["BodyWeights", "SecretSharedLink", "ShareServer", "SharedBody", "TwoPartyBody"]

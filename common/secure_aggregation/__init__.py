"""SecAgg+ (Bell et al., CCS 2020) over fedtune's messages: the server learns only a sum.

Each site adds to its quantised update a self mask (expanded from a seed ``b``) and one
pairwise mask per neighbour in a sparse graph (expanded from an X25519 agreement, so the
two ends add it with opposite signs and it cancels in the sum). Both the seed and the
mask-agreement private key are Shamir-shared among the neighbours, so the server can
remove the self masks of the sites that finished and the pairwise masks of those that
dropped out, but never both for the same site.

The maths here is pure (numpy and ``cryptography``); the Flower glue lives in
``server.secure_rounds`` and ``client.secure_aggregation``.
"""

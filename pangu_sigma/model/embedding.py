"""Token and learned position embeddings; the token table is also the tied LM head."""
import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import Normal, initializer

from pangu_sigma.parallel.dropout import HashDropout


class Embedding(nn.Cell):
    """x = dropout(token_table[ids] + position_table[start:start + S]).

    Parameters: `token_table` [V, d] (shared with the LM head, see `logits`),
    `position_table` [S_max, d], both fp32 masters initialised N(0, init_std).
    The lookup gathers float32 rows and casts them to compute_dtype (so the
    table's gradient is accumulated in float32); the result is returned in
    float32 (the residual stream of the model is kept in float32).
    """

    def __init__(self, vocab_size, seq_length, hidden_size, init_std, dropout_rate,
                 compute_dtype=ms.float32):
        super().__init__()
        self.token_table = Parameter(
            initializer(Normal(init_std), [vocab_size, hidden_size], ms.float32), name="token_table")
        self.position_table = Parameter(
            initializer(Normal(init_std), [seq_length, hidden_size], ms.float32), name="position_table")
        self.compute_dtype = compute_dtype
        self.dropout = HashDropout(dropout_rate)
        self.matmul_transpose_b = ops.MatMul(transpose_b=True)

    def construct(self, input_ids):
        """input_ids [B, S] int32 at positions 0..S-1 -> [B, S, d] float32."""
        return self.embed(input_ids, 0)

    def embed(self, input_ids, start_pos):
        """input_ids [B, T] int32 at positions start_pos..start_pos+T-1 -> [B, T, d] float32."""
        seq = input_ids.shape[1]
        # Gather from the fp32 table, then cast the rows: the backward scatter-adds into an fp32
        # gradient (a table cast first would scatter-add in fp16, where frequent tokens saturate).
        tokens = ops.cast(ops.gather(self.token_table, input_ids, 0), self.compute_dtype)  # [B, T, d]
        positions = ops.cast(self.position_table[start_pos:start_pos + seq], self.compute_dtype)  # [T, d]
        x = ops.cast(tokens + positions, ms.float32)  # [B, T, d]
        return self.dropout(x)

    def logits(self, hidden):
        """Tied LM head: hidden [B, T, d] float32 -> hidden @ token_table^T, [B, T, V] float32."""
        batch, seq, width = hidden.shape
        flat = ops.cast(hidden.reshape(batch * seq, width), self.compute_dtype)  # [B*T, d]
        table = ops.cast(self.token_table, self.compute_dtype)  # [V, d]
        scores = self.matmul_transpose_b(flat, table)  # [B*T, V]
        return ops.cast(scores, ms.float32).reshape(batch, seq, -1)  # [B, T, V]

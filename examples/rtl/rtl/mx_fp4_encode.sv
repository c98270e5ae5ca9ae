// One float32 element -> one FP4 E2M1 code at a given E8M0 block scale (OCP MX v1.0 §6.3
// step 2, the `ocp` profile of specs/semantics.md): P = round(V / X), X = 2^(scale - 127),
// round to nearest, ties to even (E1), saturate to +-6.0 (E2), sign kept for zeros (E3),
// values below half the smallest subnormal round to +-0 (E4). Combinational, synthesizable.
//
// FP4 E2M1 code: {S, E[1:0], M}; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 are codes 0..7, so a
// rounding carry out of the mantissa correctly bumps the exponent field.
//
// Compile with +define+MX_BUG_TIES_AWAY for the buggy variant (round half away from zero,
// the microxcaling default) that examples/rtl shows `mxverify check` catching.
module mx_fp4_encode (
    input  logic [31:0] x,      // float32 bit pattern (finite: the block handles NaN/Inf)
    input  logic [7:0]  scale,  // E8M0 code of the block scale, 0x00..0xFE
    output logic [3:0]  code
);
    // |x| = sig * 2^(e_eff - 150); subnormal inputs have e_eff = 1 and no hidden bit.
    wire [7:0]  e_field = x[30:23];
    wire [7:0]  e_eff   = (e_field == 8'd0) ? 8'd1 : e_field;
    wire [23:0] sig     = {e_field != 8'd0, x[22:0]};

    // y = |x| / 2^(scale-127) * 2^3 = sig * 2^(e_eff - scale - 20): a right shift by
    // scale + 20 - e_eff. The floor scale rule keeps |x| / X < 8, i.e. shift >= 18; a
    // smaller shift (only if a scale were too small) saturates.
    wire signed [9:0] shift = $signed({2'b00, scale}) + 10'sd20 - $signed({2'b00, e_eff});
    // sig has 24 bits, so any shift >= 24 leaves y = 0 (and a round bit of 0): capping at
    // 31 keeps every shifted-out bit inside the 32 guard bits below y (exact sticky).
    wire [4:0]  shift_c   = (shift > 10'sd31) ? 5'd31 : shift[4:0];
    wire [55:0] ext       = {sig, 32'd0} >> shift_c;
    wire [5:0]  y         = ext[37:32];   // |x| / X in fixed point: 3 integer . 3 fraction bits
    wire        sticky_lo = |ext[31:0];   // any bit below y's last fraction bit

    // The element binade sets the quantum: [4,8) -> 2, [2,4) -> 1, [0,2) -> 0.5 (the
    // subnormal 0.5 and the binade [1,2) share the quantum 0.5). mag is the truncated
    // magnitude code, then one guard (round) bit and a sticky bit.
    wire [2:0] mag       = y[5] ? {2'b11, y[4]} : y[4] ? {2'b10, y[3]} : {1'b0, y[3:2]};
    wire       round_bit = y[5] ? y[3] : y[4] ? y[2] : y[1];
    wire       sticky    = sticky_lo | (y[5] ? |y[2:0] : y[4] ? |y[1:0] : y[0]);
`ifdef MX_BUG_TIES_AWAY
    wire       inc = round_bit;                         // BUG: ties round away from zero
`else
    wire       inc = round_bit & (sticky | mag[0]);     // ties to even
`endif
    wire [3:0] mag_rounded = {1'b0, mag} + {3'b000, inc};

    assign code = (shift < 10'sd18 || mag_rounded[3]) ? {x[31], 3'b111}   // saturate to +-6.0
                                                       : {x[31], mag_rounded[2:0]};
endmodule

// MX quantizer: one block of K float32 values -> one E8M0 scale + K FP4 E2M1 codes,
// bit-exact with `mxref.quantize(x, "fp4_e2m1", profile="ocp")` (specs/semantics.md).
//
//   scale (S1, S2): X = 2^(floor(log2 amax) - emax), emax = 2 for E2M1. floor(log2 amax) is
//     read from the exponent field of the largest magnitude (no float log2), so the E8M0
//     code is E(amax) - 2, clamped at 0x00 (2^-127) for amax < 2^-125, which includes
//     float32 subnormal and all-zero blocks (S3).
//   NaN or Inf anywhere (S4): scale 0xFF and every code 0.
//   elements: mx_fp4_encode (RNE, saturation, signed zero).
//
// One block per clock, one cycle of latency (registered outputs). bfloat16 inputs are
// float32 with 16 zero bits appended (exact), so the same design serves both.
//
// +define+MX_BUG_ROUNDED_AMAX builds the buggy variant whose scale comes from the block
// maximum rounded to bfloat16 (as a cheap 16-bit max tree would): like a float32 log2 it
// mis-floors block maxima just below a power of two and doubles their scale.
module mx_quantize_fp4 #(
    parameter int K = 32                     // block size
) (
    input  logic            clk,
    input  logic            rst_n,
    input  logic            in_valid,
    input  logic [32*K-1:0] x,               // x[i] = x[32*i +: 32], float32 bit patterns
    output logic            out_valid,
    output logic [7:0]      scale,           // E8M0 code
    output logic [4*K-1:0]  codes            // code[i] = codes[4*i +: 4], {S, E[1:0], M}
);
    logic [30:0]    amax;                    // largest magnitude bit pattern = largest |x|
    logic           nan_inf;
    logic [7:0]     amax_exp;
    logic [7:0]     scale_c;
    logic [4*K-1:0] codes_c;

    logic [30:0]    mag [K];                 // |x[i]| as a bit pattern
    logic [K-1:0]   special;                 // x[i] is NaN or Inf (exponent all ones)
    for (genvar i = 0; i < K; i++) begin : g_split
        assign mag[i]     = x[32*i +: 31];
        assign special[i] = &x[32*i+23 +: 8];
    end

    always_comb begin
        amax = '0;
        for (int i = 0; i < K; i++)          // non-negative IEEE magnitudes order like
            if (mag[i] > amax) amax = mag[i];  // unsigned integers: no float compare
    end
    assign nan_inf = |special;

`ifdef MX_BUG_ROUNDED_AMAX
    // BUG: amax is rounded to bfloat16 (RNE) before its exponent is read; a carry out of
    // the 7-bit mantissa moves the exponent up by one.
    wire [31:0] amax_bf16 = {1'b0, amax} + 32'h7FFF + {31'd0, amax[16]};
    assign amax_exp = amax_bf16[30:23];
`else
    assign amax_exp = amax[30:23];           // floor(log2 amax) + 127 for normal amax
`endif
    assign scale_c = nan_inf           ? 8'hFF
                   : amax_exp >= 8'd2  ? amax_exp - 8'd2
                   :                     8'h00;

    for (genvar i = 0; i < K; i++) begin : g_elem
        logic [3:0] c;
        mx_fp4_encode u_enc (.x(x[32*i +: 32]), .scale(scale_c), .code(c));
        assign codes_c[4*i +: 4] = nan_inf ? 4'h0 : c;
    end

    always_ff @(posedge clk or negedge rst_n) begin
        if (!rst_n) begin
            out_valid <= 1'b0;
            scale     <= '0;
            codes     <= '0;
        end else begin
            out_valid <= in_valid;
            if (in_valid) begin
                scale <= scale_c;
                codes <= codes_c;
            end
        end
    end
endmodule

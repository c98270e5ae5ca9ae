// $readmemh testbench for mx_quantize_fp4 on `mxverify gen --op quantize` vectors.
//
//   vvp sim.vvp +vectors=vec/vectors.hex +n=233 +dut=dut.hex
//
// vectors.hex: one vector per line, x[0..31] (float32) then the expected scale and codes,
// x[0] in the most significant bits (docs/verification.md). The expected fields are not
// used here: `mxverify check` recomputes them with mxref. dut.hex is written in the
// expected.hex layout: the scale byte then the 32 code bytes, joined by '_'.
module tb_mx_quantize;
    localparam int K = 32;
    localparam int W = 32*K + 8 + 8*K;       // 1288 bits per vector line
    parameter int MAX_N = 16384;             // level 2 has 4094 quantize vectors

    logic [W-1:0]   vec [0:MAX_N-1];
    logic           clk = 1'b0, rst_n = 1'b0, in_valid = 1'b0;
    logic [32*K-1:0] x = '0;
    logic           out_valid;
    logic [7:0]     scale;
    logic [4*K-1:0] codes;
    string          vec_path, dut_path;
    int             n, fd, written = 0;

    mx_quantize_fp4 #(.K(K)) dut (.clk, .rst_n, .in_valid, .x, .out_valid, .scale, .codes);

    always #5 clk = ~clk;

    // One output line per valid result, in order.
    always @(posedge clk) begin
        if (out_valid) begin
            $fwrite(fd, "%02h", scale);
            for (int i = 0; i < K; i++) $fwrite(fd, "_%02h", {4'h0, codes[4*i +: 4]});
            $fwrite(fd, "\n");
            written++;
        end
    end

    initial begin
        if (!$value$plusargs("vectors=%s", vec_path) || !$value$plusargs("n=%d", n)
            || !$value$plusargs("dut=%s", dut_path))
            $fatal(1, "usage: vvp sim.vvp +vectors=DIR/vectors.hex +n=N +dut=OUT.hex");
        if (n < 1 || n > MAX_N) $fatal(1, "+n=%0d: need 1..%0d (raise MAX_N)", n, MAX_N);
        $readmemh(vec_path, vec, 0, n - 1);
        fd = $fopen(dut_path, "w");
        if (fd == 0) $fatal(1, "cannot write %s", dut_path);

        repeat (2) @(negedge clk);
        rst_n = 1'b1;
        for (int v = 0; v < n; v++) begin            // one block per clock
            @(negedge clk);
            for (int i = 0; i < K; i++) x[32*i +: 32] = vec[v][W-1-32*i -: 32];
            in_valid = 1'b1;
        end
        @(negedge clk) in_valid = 1'b0;
        @(negedge clk);
        $fclose(fd);
        if (written != n) $fatal(1, "wrote %0d of %0d vectors", written, n);
        $display("tb_mx_quantize: %0d vectors -> %s", n, dut_path);
        $finish;
    end
endmodule

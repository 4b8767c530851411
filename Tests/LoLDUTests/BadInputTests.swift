import CLoLDU
import Testing

/// Every bad input is answered by its status and a message naming the argument — never a crash.
@Suite struct BadInputTests {
    struct Case: CustomStringConvertible, Sendable {
        let name: String
        let expected: loldu_status
        let mentions: String
        let call: @Sendable () -> loldu_status
        var description: String { name }
    }

    static let w: [Float] = (0..<12).map { Float($0 % 5) - 1.5 }

    static func create(
        dtype: loldu_dtype = LOLDU_FLOAT32, m: Int64 = 3, n: Int64 = 4, weight: [Float]? = w, bias: [Float]? = nil,
        _ edit: (inout loldu_config) -> Void = { _ in }
    ) -> loldu_status {
        var config = loldu_config()
        _ = loldu_config_default(&config)
        config.rank = 2
        edit(&config)
        var handle: OpaquePointer?
        let status = loldu_adapter_create(&handle, dtype, m, n, weight, bias, &config)
        loldu_adapter_free(handle)
        return status
    }

    /// A live adapter (3 × 4, rank 2, no bias) for calls that need one.
    static func withAdapter(_ body: (OpaquePointer) -> loldu_status) -> loldu_status {
        var config = loldu_config()
        _ = loldu_config_default(&config)
        config.rank = 2
        var handle: OpaquePointer?
        guard loldu_adapter_create(&handle, LOLDU_FLOAT32, 3, 4, w, nil, &config) == LOLDU_OK, let handle else {
            return LOLDU_ERR_INTERNAL
        }
        defer { loldu_adapter_free(handle) }
        return body(handle)
    }

    static let x = [Float](repeating: 1, count: 8)

    static let cases: [Case] = [
        Case(name: "NULL out", expected: LOLDU_ERR_NULL_POINTER, mentions: "out") {
            var config = loldu_config()
            _ = loldu_config_default(&config)
            return loldu_adapter_create(nil, LOLDU_FLOAT32, 3, 4, w, nil, &config)
        },
        Case(name: "NULL weight", expected: LOLDU_ERR_NULL_POINTER, mentions: "weight") { create(weight: nil) },
        Case(name: "m = 0", expected: LOLDU_ERR_SHAPE, mentions: "m must be in [1,") { create(m: 0) },
        Case(name: "n = 0", expected: LOLDU_ERR_SHAPE, mentions: "n must be in [1,") { create(n: 0) },
        Case(name: "n < 0", expected: LOLDU_ERR_SHAPE, mentions: "got -4") { create(n: -4) },
        Case(name: "m beyond 32 bits", expected: LOLDU_ERR_SHAPE, mentions: "m must be") { create(m: 1 << 40) },
        Case(name: "m × n overflows", expected: LOLDU_ERR_SHAPE, mentions: "too large") {
            create(m: Int64(Int32.max), n: Int64(Int32.max))
        },
        Case(name: "r < 0", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "config.rank must be 0 (full rank) or in [1, min(m, n)] = [1, 3], got -1") {
            create { $0.rank = -1 }
        },
        Case(name: "r > min(m, n)", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "got 4") { create { $0.rank = 4 } },
        Case(name: "negative alpha", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "config.alpha") { create { $0.alpha = -1 } },
        Case(name: "NaN alpha", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "config.alpha") { create { $0.alpha = .nan } },
        Case(name: "NaN in W", expected: LOLDU_ERR_NOT_FINITE, mentions: "weight[2, 1]") {
            var bad = w
            bad[9] = .nan
            return create(weight: bad)
        },
        Case(name: "Inf in bias", expected: LOLDU_ERR_NOT_FINITE, mentions: "bias[0]") {
            create(bias: [.infinity, 0, 0])
        },
        Case(name: "LU overflows float", expected: LOLDU_ERR_NOT_FINITE, mentions: "overflows float32") {
            var config = loldu_config()
            _ = loldu_config_default(&config)
            config.rank = 2
            var handle: OpaquePointer?
            let status = loldu_adapter_create(&handle, LOLDU_FLOAT32, 2, 2, [Float(3e38), 3e38, 3e38, -3e38], nil, &config)
            loldu_adapter_free(handle)
            return status
        },
        Case(name: "sigma overflows float", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "sigma") {
            create { $0.alpha = 1e39 }
        },
        Case(name: "initial coefficients overflow float", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "config.alpha") {
            // σ₀ z₀ = 3e38 and σ₀ D = −2.7e38 are finite, their difference is not.
            var config = loldu_config()
            _ = loldu_config_default(&config)
            config.z_init = LOLDU_INIT_ONES.i32
            config.alpha = 3e38
            var handle: OpaquePointer?
            let status = loldu_adapter_create(&handle, LOLDU_FLOAT32, 1, 1, [Float(-0.9)], nil, &config)
            loldu_adapter_free(handle)
            return status
        },
        Case(name: "sigma rounds to zero", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "nonzero") {
            create { $0.alpha = 1e-50 }
        },
        Case(name: "set sigma making sigma z overflow", expected: LOLDU_ERR_NOT_FINITE, mentions: "overflows") {
            withAdapter { a in loldu_set_sigma(a, 3e38) }
        },
        Case(name: "merged weight not finite", expected: LOLDU_ERR_NOT_FINITE, mentions: "merged weight") {
            // W = [[1, 1], [1, 2]]: A = L, U_r = W's U, and W_eff[1, 1] = 2 + c₀ + c₁.
            var config = loldu_config()
            _ = loldu_config_default(&config)
            config.rank = 2
            var handle: OpaquePointer?
            guard loldu_adapter_create(&handle, LOLDU_FLOAT32, 2, 2, [Float(1), 1, 1, 2], nil, &config) == LOLDU_OK,
                  loldu_set_z(handle, [Float(3e38), 3e38]) == LOLDU_OK
            else { return LOLDU_ERR_INTERNAL }
            defer { loldu_adapter_free(handle) }
            let status = loldu_merge(handle)
            var info = loldu_adapter_info()
            _ = loldu_adapter_get_info(handle, &info, MemoryLayout<loldu_adapter_info>.size)
            return info.merged == 0 ? status : LOLDU_ERR_INTERNAL
        },
        Case(name: "unknown dtype", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "dtype") {
            create(dtype: loldu_dtype(rawValue: 7))
        },
        Case(name: "unknown z_init", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "config.z_init") {
            create { $0.z_init = 42 }
        },
        Case(name: "unknown residual", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "config.residual") {
            create { $0.residual = -1 }
        },
        Case(name: "train_sigma not 0/1", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "config.train_sigma") {
            create { $0.train_sigma = 2 }
        },
        Case(name: "uninitialised config", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "config.struct_size") {
            create { $0.struct_size = 0 }
        },
        Case(name: "NULL config struct", expected: LOLDU_ERR_NULL_POINTER, mentions: "config") {
            loldu_config_default(nil)
        },
        Case(name: "NULL adapter", expected: LOLDU_ERR_NULL_POINTER, mentions: "adapter") {
            var y = [Float](repeating: 0, count: 6)
            return loldu_forward(nil, 2, x, &y, nil)
        },
        Case(name: "made-up handle", expected: LOLDU_ERR_INVALID_HANDLE, mentions: "not a live") {
            var y = [Float](repeating: 0, count: 6)
            return loldu_forward(OpaquePointer(bitPattern: 0xDEAD_BEE0), 2, x, &y, nil)
        },
        Case(name: "freed handle", expected: LOLDU_ERR_INVALID_HANDLE, mentions: "already freed") {
            var config = loldu_config()
            _ = loldu_config_default(&config)
            config.rank = 2
            var handle: OpaquePointer?
            _ = loldu_adapter_create(&handle, LOLDU_FLOAT32, 3, 4, w, nil, &config)
            loldu_adapter_free(handle)
            loldu_adapter_free(handle)  // a double free is a no-op
            var y = [Float](repeating: 0, count: 6)
            return loldu_forward(handle, 2, x, &y, nil)
        },
        Case(name: "negative batch", expected: LOLDU_ERR_SHAPE, mentions: "batch") {
            withAdapter { a in
                var y = [Float](repeating: 0, count: 6)
                return loldu_forward(a, -1, x, &y, nil)
            }
        },
        Case(name: "NULL x", expected: LOLDU_ERR_NULL_POINTER, mentions: "x is NULL") {
            withAdapter { a in
                var y = [Float](repeating: 0, count: 6)
                return loldu_forward(a, 2, nil, &y, nil)
            }
        },
        Case(name: "NULL dy", expected: LOLDU_ERR_NULL_POINTER, mentions: "dy is NULL") {
            withAdapter { a in loldu_backward(a, 2, x, nil, nil, nil) }
        },
        Case(name: "misaligned y", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "y must be aligned to 4 bytes") {
            withAdapter { a in
                var bytes = [UInt8](repeating: 0, count: 64)
                return bytes.withUnsafeMutableBytes { loldu_forward(a, 2, x, $0.baseAddress! + 1, nil) }
            }
        },
        Case(name: "unknown path", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "path") {
            withAdapter { a in loldu_set_path(a, loldu_path(rawValue: 9)) }
        },
        Case(name: "unknown factor", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "which") {
            withAdapter { a in
                var out = [Float](repeating: 0, count: 12)
                return loldu_get_factor(a, loldu_factor(rawValue: 17), &out)
            }
        },
        Case(name: "bias of a bias-free adapter", expected: LOLDU_ERR_STATE, mentions: "no bias") {
            withAdapter { a in
                var out = [Float](repeating: 0, count: 3)
                return loldu_get_factor(a, LOLDU_FACTOR_BIAS, &out)
            }
        },
        Case(name: "NaN in z", expected: LOLDU_ERR_NOT_FINITE, mentions: "z[1]") {
            withAdapter { a in loldu_set_z(a, [Float(1), .nan]) }
        },
        Case(name: "infinite sigma", expected: LOLDU_ERR_NOT_FINITE, mentions: "sigma") {
            withAdapter { a in loldu_set_sigma(a, .infinity) }
        },
        Case(name: "sigma beyond float", expected: LOLDU_ERR_NOT_FINITE, mentions: "sigma") {
            withAdapter { a in loldu_set_sigma(a, 1e300) }
        },
        Case(name: "enabled not 0/1", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "enabled") {
            withAdapter { a in loldu_set_enabled(a, 5) }
        },
        Case(name: "wrong info size", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "info_size") {
            withAdapter { a in
                var info = loldu_adapter_info()
                return loldu_adapter_get_info(a, &info, 3)
            }
        },
        Case(name: "NULL pivots", expected: LOLDU_ERR_NULL_POINTER, mentions: "ipiv") {
            withAdapter { a in loldu_get_pivots(a, nil) }
        },
        Case(name: "zero threads", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "threads") {
            loldu_set_num_threads(0)
        },
        Case(name: "y over x", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "y overlaps x") {
            withAdapter { a in
                let buffer = UnsafeMutablePointer<Float>.allocate(capacity: 8)
                defer { buffer.deallocate() }
                buffer.initialize(repeating: 1, count: 8)
                return loldu_forward(a, 2, buffer, buffer + 2, nil)
            }
        },
        Case(name: "dx over dy", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "dx overlaps dy") {
            withAdapter { a in
                let buffer = UnsafeMutablePointer<Float>.allocate(capacity: 16)
                defer { buffer.deallocate() }
                buffer.initialize(repeating: 1, count: 16)
                return loldu_backward(a, 2, buffer, buffer + 8, buffer + 8, nil)
            }
        },
        Case(name: "grads over x", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "grads overlaps x") {
            withAdapter { a in
                let buffer = UnsafeMutablePointer<Float>.allocate(capacity: 16)
                defer { buffer.deallocate() }
                buffer.initialize(repeating: 1, count: 16)
                return loldu_backward_into(a, 2, buffer, buffer + 8, nil, nil, buffer)
            }
        },
        Case(name: "grouped count SIZE_MAX", expected: LOLDU_ERR_INVALID_ARGUMENT,
             mentions: "count must be in [1, 2147483647], got 18446744073709551615") {
            withAdapter { a in
                var x = [Float](repeating: 1, count: 8), y = x
                return loldu_grouped_forward([a], Int.max &* 2 &+ 1, 2, [0, -1], &x, &y)
            }
        },
        Case(name: "convert to float64", expected: LOLDU_ERR_INVALID_ARGUMENT,
             mentions: "dtype = float64: cannot convert a float32 adapter (src) to it") {
            withAdapter { a in
                var out: OpaquePointer?
                return loldu_adapter_convert(&out, a, LOLDU_FLOAT64)
            }
        },
        Case(name: "grouped y over x", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "y overlaps x") {
            withAdapter { a in
                let buffer = UnsafeMutablePointer<Float>.allocate(capacity: 8)
                defer { buffer.deallocate() }
                buffer.initialize(repeating: 1, count: 8)
                return loldu_grouped_forward([a], 1, 2, [0, -1], buffer, buffer)
            }
        },
        Case(name: "grouped grads over each other", expected: LOLDU_ERR_INVALID_ARGUMENT, mentions: "grads[1] overlaps grads[0]") {
            withAdapter { a in
                var clone: OpaquePointer?
                guard loldu_adapter_clone(&clone, a) == LOLDU_OK, let clone else { return LOLDU_ERR_INTERNAL }
                defer { loldu_adapter_free(clone) }
                let buffer = UnsafeMutablePointer<Float>.allocate(capacity: 32)
                defer { buffer.deallocate() }
                buffer.initialize(repeating: 1, count: 32)
                let grads: [UnsafeMutableRawPointer?] = [UnsafeMutableRawPointer(buffer + 20), UnsafeMutableRawPointer(buffer + 22)]
                return loldu_grouped_backward_into([a, clone], 2, 2, [0, 1], buffer, buffer + 8, nil, grads)
            }
        },
        Case(name: "plan for a negative batch", expected: LOLDU_ERR_SHAPE, mentions: "batch") {
            withAdapter { a in
                var path = LOLDU_PATH_AUTO
                return loldu_plan(a, -1, 0, &path)
            }
        },
    ]

    @Test(arguments: cases)
    func answeredByStatusAndMessage(_ c: Case) {
        let status = c.call()
        #expect(status == c.expected, "\(c.name): got \(status.rawValue) \(String(cString: loldu_last_error()))")
        let message = String(cString: loldu_last_error())
        #expect(message.contains(c.mentions), "\(c.name): message \"\(message)\" should mention \"\(c.mentions)\"")
    }

    @Test func freeingNullIsANoOp() {
        loldu_adapter_free(nil)
        loldu_optimizer_free(nil)
        loldu_checkpoint_free(nil)
    }

    @Test func emptyBatchIgnoresItsBuffers() {
        #expect(Self.withAdapter { a in loldu_forward(a, 0, nil, nil, nil) } == LOLDU_OK)
        #expect(Self.withAdapter { a in loldu_backward(a, 0, nil, nil, nil, nil) } == LOLDU_OK)
    }
}

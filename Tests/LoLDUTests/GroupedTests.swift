import CLoLDU
import Foundation
import Testing

/// Many adapters on one base: derived adapters share the frozen factors, a grouped batch gives
/// every row what its own adapter gives it, and several adapters train in one batch.
@Suite struct GroupedTests {
    static func derive(_ base: OpaquePointer, rank: Int, edit: (inout loldu_config) -> Void = { _ in }) throws -> OpaquePointer {
        var config = loldu_config()
        _ = loldu_config_default(&config)
        config.rank = Int64(rank)
        edit(&config)
        var handle: OpaquePointer?
        let status = loldu_adapter_derive(&handle, base, &config)
        guard status == LOLDU_OK, let handle else { throw LibraryError(status: status, message: String(cString: loldu_last_error())) }
        return handle
    }

    /// A rank-r adapter derived from a rank-R base uses the first r columns of A and rows of U_r:
    /// the factors a direct rank-r adapter computes (to rounding), the same pivots, and outputs
    /// equal to rounding; it costs its z and σ, not a copy of the factors.
    @Test func derivedAdapterIsANestedPrefixOfTheBase() throws {
        var random = TestRandom(401)
        let (m, n, big, small, batch) = (30, 22, 16, 7, 5)
        let w: [Double] = random.array(m * n), b: [Double] = random.array(m)
        let base = try TestAdapter<Double>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(big) }
        let direct = try TestAdapter<Double>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(small) }
        let derived = try Self.derive(base.handle, rank: small)
        defer { loldu_adapter_free(derived) }
        let info = adapterInfo(derived)
        #expect(info.rank == Int64(small) && info.factor_rank == Int64(big))
        #expect(info.bytes_state == Int64((small + 1) * 8), "only z and σ: \(info.bytes_state)")
        #expect(info.bytes_weight == adapterInfo(base.handle).bytes_weight)
        for (which, count) in [(LOLDU_FACTOR_LOWER, m * small), (LOLDU_FACTOR_UPPER, small * n), (LOLDU_FACTOR_DIAG, small)] {
            var got = [Double](repeating: .nan, count: count)
            #expect(loldu_get_factor(derived, which, &got) == LOLDU_OK)
            expectClose(got, direct.factor(which), rtol: 1e-12, atol: 1e-12, "factor \(which.rawValue)")
        }
        var pivots = [Int32](repeating: 0, count: small)
        #expect(loldu_get_pivots(derived, &pivots) == LOLDU_OK && pivots == direct.pivots)
        let z: [Double] = random.array(small)
        direct.z = z
        #expect(loldu_set_z(derived, z) == LOLDU_OK)
        let x: [Double] = random.array(batch * n)
        var y = [Double](repeating: .nan, count: batch * m)
        #expect(loldu_forward(derived, Int64(batch), x, &y, nil) == LOLDU_OK)
        expectClose(y, direct.forward(x, batch: batch), rtol: 1e-12, atol: 1e-12, "outputs")
        // A rank above the base's is refused; so is a bad configuration.
        #expect(throws: LibraryError.self) { _ = try Self.derive(base.handle, rank: big + 1) }
        #expect(String(cString: loldu_last_error()).contains("[1, \(big)]"))
        #expect(throws: LibraryError.self) { _ = try Self.derive(base.handle, rank: 2) { $0.alpha = -1 } }
    }

    /// The adapters of a grouped test: base rank R, three of rank R with different z, one of a
    /// smaller rank, one disabled, one merged, on float64.
    final class Fleet {
        let base: TestAdapter<Double>
        var adapters: [OpaquePointer] = []
        let ranks: [Int]
        let (m, n, big) = (26, 20, 10)

        init() throws {
            var random = TestRandom(409)
            base = try TestAdapter<Double>(m: m, n: n, weight: random.array(m * n), bias: random.array(m)) { $0.rank = 10 }
            ranks = [10, 10, 10, 4, 10, 10]
            for (i, r) in ranks.enumerated() {
                let a = try GroupedTests.derive(base.handle, rank: r) { $0.seed = UInt64(i) }
                var z = [Double](repeating: 0, count: r)
                _ = loldu_get_z(a, &z)
                z = z.map { $0 * (1 + 0.5 * random.symmetric()) }
                #expect(loldu_set_z(a, z) == LOLDU_OK)
                adapters.append(a)
            }
            #expect(loldu_set_enabled(adapters[4], 0) == LOLDU_OK)
            #expect(loldu_merge(adapters[5]) == LOLDU_OK)
        }

        deinit { adapters.forEach { loldu_adapter_free($0) } }
    }

    static func grads(_ a: OpaquePointer, _ count: Int) -> [Double] {
        var g: UnsafeMutableRawPointer?
        _ = loldu_params(a, nil, &g)
        return Array(UnsafeBufferPointer(start: g!.assumingMemoryBound(to: Double.self), count: count))
    }

    static func biasGrad(_ a: OpaquePointer, _ m: Int) -> [Double] {
        var g: UnsafeMutableRawPointer?
        _ = loldu_bias_grad(a, &g)
        return Array(UnsafeBufferPointer(start: g!.assumingMemoryBound(to: Double.self), count: m))
    }

    /// A bias given with a grouped call is the layer's own bias to the last bit: a fleet derived
    /// from a base without bias, given the bias per call, computes what the fleet with the bias
    /// computes; factors with a bias of their own refuse a second one, writing nothing.
    @Test func biasGivenPerGroupedCallEqualsTheLayersOwn() throws {
        // Below and above the size below which float32 products skip oneDNN.
        for (m, n, r, batch) in [(18, 12, 6, 9), (64, 40, 12, 9)] {
            try check(Float.self, m, n, r, batch)
            try check(Double.self, m, n, r, batch)
        }

        func check<T: TestScalar>(_: T.Type, _ m: Int, _ n: Int, _ r: Int, _ batch: Int) throws {
            var random = TestRandom(431)
            let w: [T] = random.array(m * n), b: [T] = random.array(m), x: [T] = random.array(batch * n)
            let plain = try TestAdapter<T>(m: m, n: n, weight: w) { $0.rank = Int64(r) }
            let own = try TestAdapter<T>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(r) }
            var fleets: [[OpaquePointer?]] = [[], []]
            defer { fleets.joined().forEach { loldu_adapter_free($0) } }
            for seed in 0..<3 {
                for (k, base) in [plain, own].enumerated() {
                    fleets[k].append(try GroupedTests.derive(base.handle, rank: r - seed) { $0.seed = UInt64(seed); $0.z_init = LOLDU_INIT_S_NORMAL.i32 })
                }
            }
            let rows: [Int32] = (0..<batch).map { Int32($0 % 4) - 1 }
            var y = [T](repeating: .nan, count: batch * m), expected = y
            #expect(loldu_grouped_forward_bias(fleets[0], 3, Int64(batch), rows, x, b, &y) == LOLDU_OK)
            #expect(loldu_grouped_forward(fleets[1], 3, Int64(batch), rows, x, &expected) == LOLDU_OK)
            #expect(y == expected, "\(T.self)")
            #expect(loldu_grouped_forward_bias(fleets[0], 3, Int64(batch), rows, x, nil, &y) == LOLDU_OK)
            var unbiased = [T](repeating: .nan, count: batch * m)
            #expect(loldu_grouped_forward(fleets[0], 3, Int64(batch), rows, x, &unbiased) == LOLDU_OK)
            #expect(y == unbiased, "\(T.self): NULL bias is loldu_grouped_forward")
            var untouched = [T](repeating: .nan, count: batch * m)
            #expect(loldu_grouped_forward_bias(fleets[1], 3, Int64(batch), rows, x, b, &untouched) == LOLDU_ERR_STATE)
            #expect(untouched.allSatisfy { $0.isNaN }, "nothing written on failure")
            #expect(loldu_grouped_forward_bias(fleets[1], 3, 0, nil, nil, b, nil) == LOLDU_ERR_STATE, "whatever the batch")
        }
    }

    @Test func everyRowGetsWhatItsOwnAdapterGivesIt() throws {
        let f = try Fleet()
        let (m, n, batch) = (f.m, f.n, 40)
        var random = TestRandom(419)
        let rows: [Int32] = (0..<batch).map { Int32(($0 * 5 + 3) % (f.adapters.count + 1) - 1) }  // -1 … 5, mixed
        let x: [Double] = random.array(batch * n), dy: [Double] = random.array(batch * m)
        var y = [Double](repeating: .nan, count: batch * m), dx = [Double](repeating: .nan, count: batch * n)
        let handles: [OpaquePointer?] = f.adapters
        #expect(loldu_grouped_forward(handles, handles.count, Int64(batch), rows, x, &y) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
        #expect(loldu_grouped_backward(handles, handles.count, Int64(batch), rows, x, dy, &dx) == LOLDU_OK)
        let bare = bareLayer(x, f.base.weight, f.base.bias, batch: batch, m: m, n: n)
        #expect(Set(rows) == Set(-1...Int32(f.adapters.count - 1)), "every adapter and -1 appear")

        for (i, a) in f.adapters.enumerated() {
            // The whole batch through adapter i alone, on the factored path (its rows compared).
            let alone = try TestAdapter<Double>.clone(a)
            #expect(loldu_set_path(alone.handle, LOLDU_PATH_FACTORED) == LOLDU_OK)
            let yAlone = alone.forward(x, batch: batch)
            let dxAlone = alone.backward(x, dy, batch: batch)
            for b in 0..<batch where rows[b] == Int32(i) {
                let row = Array(y[(b * m)..<((b + 1) * m)]), expected = Array(yAlone[(b * m)..<((b + 1) * m)])
                let dxRow = Array(dx[(b * n)..<((b + 1) * n)]), dxExpected = Array(dxAlone[(b * n)..<((b + 1) * n)])
                if i == 4 {  // disabled: the pretrained layer
                    #expect(row == Array(bare[(b * m)..<((b + 1) * m)]), "disabled adapter, row \(b)")
                } else if f.ranks[i] == f.big {
                    #expect(row == expected, "adapter \(i), row \(b): bit for bit")
                    #expect(dxRow == dxExpected, "adapter \(i), row \(b): dX bit for bit")
                } else {
                    expectClose(row, expected, rtol: 1e-13, atol: 1e-13, "adapter \(i) (rank \(f.ranks[i])), row \(b)")
                    expectClose(dxRow, dxExpected, rtol: 1e-13, atol: 1e-13, "adapter \(i), dX row \(b)")
                }
            }
            // dz, dσ and db of adapter i from its own rows: adapter i alone on just those rows.
            let mine = (0..<batch).filter { rows[$0] == Int32(i) }
            let xi = mine.flatMap { x[($0 * n)..<(($0 + 1) * n)] }, dyi = mine.flatMap { dy[($0 * m)..<(($0 + 1) * m)] }
            let own = try TestAdapter<Double>.clone(a)
            own.backward(xi, dyi, batch: mine.count)
            let r = f.ranks[i]
            if i == 4 || i == 5 {
                #expect(Self.grads(a, r + 1).allSatisfy { $0 == 0 }, "disabled or merged adapter \(i) got a gradient")
            } else {
                expectClose(Self.grads(a, r + 1), own.grads, rtol: 1e-12, atol: 1e-12, "adapter \(i): dz, dσ from its rows")
            }
            expectClose(Self.biasGrad(a, m), own.biasGrad, rtol: 1e-12, atol: 1e-12, "adapter \(i): db from its rows")
        }
        for b in 0..<batch where rows[b] < 0 {
            #expect(Array(y[(b * m)..<((b + 1) * m)]) == Array(bare[(b * m)..<((b + 1) * m)]), "row \(b) without adapter")
        }
    }

    /// Two adapters trained together in mixed batches end where each ends trained alone on its
    /// own rows (float64: to rounding).
    @Test func twoAdaptersTrainedInMixedBatchesMatchTrainingApart() throws {
        var random = TestRandom(421)
        let (m, n, r, batch, steps) = (12, 9, 6, 16, 25)
        let w: [Double] = random.array(m * n), bias: [Double] = random.array(m)
        let x: [Double] = random.array(batch * n), target: [Double] = random.array(batch * m)
        let rows: [Int32] = (0..<batch).map { Int32($0 % 3 == 0 ? 1 : 0) }
        let base = try TestAdapter<Double>(m: m, n: n, weight: w, bias: bias) { $0.rank = Int64(r) }

        func optimizer(_ handles: [OpaquePointer?]) -> OpaquePointer? {
            var c = loldu_optimizer_config(), o: OpaquePointer?
            _ = loldu_optimizer_config_default(&c, LOLDU_ADAMW)
            c.lr = 0.02
            #expect(loldu_optimizer_create(&o, &c, handles, handles.count) == LOLDU_OK)
            return o
        }
        // Together.
        let together: [OpaquePointer?] = try [Self.derive(base.handle, rank: r) { $0.seed = 1 }, Self.derive(base.handle, rank: r) { $0.seed = 2; $0.z_init = LOLDU_INIT_NORMAL.i32; $0.residual = LOLDU_RESIDUAL_INIT.i32 }]
        defer { together.forEach { loldu_adapter_free($0) } }
        let joint = optimizer(together)
        defer { loldu_optimizer_free(joint) }
        for _ in 0..<steps {
            var y = [Double](repeating: 0, count: batch * m)
            #expect(loldu_grouped_forward(together, 2, Int64(batch), rows, x, &y) == LOLDU_OK)
            let dy = zip(y, target).map { $0 - $1 }
            #expect(loldu_grouped_backward(together, 2, Int64(batch), rows, x, dy, nil) == LOLDU_OK)
            #expect(loldu_optimizer_step(joint, nil) == LOLDU_OK)
            #expect(loldu_optimizer_zero_grad(joint) == LOLDU_OK)
        }
        // Apart, each on its own rows.
        for (i, seed) in [(0, UInt64(1)), (1, UInt64(2))] {
            let alone = try Self.derive(base.handle, rank: r) { c in
                c.seed = seed
                if i == 1 { c.z_init = LOLDU_INIT_NORMAL.i32; c.residual = LOLDU_RESIDUAL_INIT.i32 }
            }
            defer { loldu_adapter_free(alone) }
            #expect(loldu_set_path(alone, LOLDU_PATH_FACTORED) == LOLDU_OK)
            let o = optimizer([alone])
            defer { loldu_optimizer_free(o) }
            let mine = (0..<batch).filter { rows[$0] == Int32(i) }
            let xi = mine.flatMap { x[($0 * n)..<(($0 + 1) * n)] }, ti = mine.flatMap { target[($0 * m)..<(($0 + 1) * m)] }
            for _ in 0..<steps {
                var y = [Double](repeating: 0, count: mine.count * m)
                #expect(loldu_forward(alone, Int64(mine.count), xi, &y, nil) == LOLDU_OK)
                let dy = zip(y, ti).map { $0 - $1 }
                #expect(loldu_backward(alone, Int64(mine.count), xi, dy, nil, nil) == LOLDU_OK)
                #expect(loldu_optimizer_step(o, nil) == LOLDU_OK)
                #expect(loldu_optimizer_zero_grad(o) == LOLDU_OK)
            }
            var zTogether = [Double](repeating: 0, count: r), zApart = zTogether
            _ = loldu_get_z(together[i], &zTogether)
            _ = loldu_get_z(alone, &zApart)
            expectClose(zTogether, zApart, rtol: 1e-10, atol: 1e-10, "adapter \(i): z after \(steps) steps")
        }
    }

    @Test func badRowsAndForeignFactorsAreRefusedAndWriteNothing() throws {
        let f = try Fleet()
        var random = TestRandom(431)
        let other = try TestAdapter<Double>(m: f.m, n: f.n, weight: random.array(f.m * f.n)) { $0.rank = 10 }
        let x: [Double] = random.array(3 * f.n), dy: [Double] = random.array(3 * f.m)
        let handles: [OpaquePointer?] = f.adapters
        let before = Self.grads(f.adapters[0], 11)
        for (rows, what) in [([0, 9, 1] as [Int32], "rows[1] = 9"), ([0, 1, -2], "rows[2] = -2")] {
            var y = [Double](repeating: -7, count: 3 * f.m)
            #expect(loldu_grouped_forward(handles, handles.count, 3, rows, x, &y) == LOLDU_ERR_INVALID_ARGUMENT)
            #expect(String(cString: loldu_last_error()).contains(what), "\(String(cString: loldu_last_error()))")
            #expect(y.allSatisfy { $0 == -7 }, "a refused call wrote y")
            #expect(loldu_grouped_backward(handles, handles.count, 3, rows, x, dy, nil) == LOLDU_ERR_INVALID_ARGUMENT)
        }
        let mixed: [OpaquePointer?] = [f.adapters[0], other.handle]
        var y = [Double](repeating: -7, count: 3 * f.m)
        #expect(loldu_grouped_forward(mixed, 2, 3, [0, 1, 0], x, &y) == LOLDU_ERR_MISMATCH)
        #expect(String(cString: loldu_last_error()).contains("adapters[1]"), "\(String(cString: loldu_last_error()))")
        #expect(loldu_grouped_backward(mixed, 2, 3, [0, 1, 0], x, dy, nil) == LOLDU_ERR_MISMATCH)
        #expect(y.allSatisfy { $0 == -7 } && Self.grads(f.adapters[0], 11) == before)
        // The message names the entry of the caller's list, whichever entries the rows skip.
        let skipping: [OpaquePointer?] = [f.adapters[0], f.adapters[1], other.handle]
        #expect(loldu_grouped_forward(skipping, 3, 3, [0, 2, 0], x, &y) == LOLDU_ERR_MISMATCH)
        #expect(String(cString: loldu_last_error()).contains("adapters[2]"), "\(String(cString: loldu_last_error()))")
        let single = try TestAdapter<Float>(m: f.m, n: f.n, weight: random.array(f.m * f.n)) { $0.rank = 10 }
        #expect(loldu_grouped_forward([f.adapters[0], single.handle], 2, 3, [0, 1, 0], x, &y) == LOLDU_ERR_MISMATCH)
        #expect(String(cString: loldu_last_error()).contains("element type"), "\(String(cString: loldu_last_error()))")
        #expect(y.allSatisfy { $0 == -7 })
        // A count far larger than the batch: only the entries the rows use are read.
        var wide = [Double](repeating: 0, count: 3 * f.m), narrow = wide
        #expect(loldu_grouped_forward(handles, Int(Int32.max), 3, [0, 1, -1], x, &wide) == LOLDU_OK)
        #expect(loldu_grouped_forward(handles, handles.count, 3, [0, 1, -1], x, &narrow) == LOLDU_OK)
        #expect(wide == narrow)
        #expect(loldu_grouped_forward(handles, handles.count, 3, nil, x, &y) == LOLDU_ERR_NULL_POINTER)
        #expect(loldu_grouped_forward(handles, 0, 3, [0, 0, 0], x, &y) == LOLDU_ERR_INVALID_ARGUMENT)
        // An unused entry of the list is not looked at; adapters[0] (the base) always is.
        let withStale: [OpaquePointer?] = [f.adapters[0], OpaquePointer(bitPattern: 0xBAD0)]
        #expect(loldu_grouped_forward(withStale, 2, 3, [0, 0, -1], x, &y) == LOLDU_OK)
        #expect(loldu_grouped_forward(withStale, 2, 3, [0, 1, -1], x, &y) == LOLDU_ERR_INVALID_HANDLE)
    }

    /// 1,000 adapters saved in 1,000 checkpoint directories, loaded onto one base: each is a
    /// derived adapter (no factorisation, no copy of W) with exactly its saved z and σ.
    @Test func aThousandCheckpointsLoadOntoOneBase() throws {
        let directory = try temporaryDirectory()
        var random = TestRandom(433)
        let (m, n, count) = (16, 12, 1000)
        let w: [Float] = random.array(m * n)
        let base = try TestAdapter<Float>(m: m, n: n, weight: w) { $0.rank = 8 }
        var saved: [[Float]] = []
        for i in 0..<count {
            let a = try Self.derive(base.handle, rank: 1 + i % 8) { $0.seed = UInt64(i) }
            defer { loldu_adapter_free(a) }
            let z = (0..<(1 + i % 8)).map { _ in Float(random.symmetric()) }
            #expect(loldu_set_z(a, z) == LOLDU_OK)
            saved.append(z)
            #expect(withCStrings(["encoder.q"]) { loldu_checkpoint_save("\(directory)/\(i)", [a], $0, 1) } == LOLDU_OK)
        }
        // A fresh base (as in a new process), then every checkpoint on it.
        let fresh = try TestAdapter<Float>(m: m, n: n, weight: w) { $0.rank = 8 }
        var loaded: [OpaquePointer] = []
        defer { loaded.forEach { loldu_adapter_free($0) } }
        for i in 0..<count {
            var checkpoint: OpaquePointer?
            #expect(loldu_checkpoint_open(&checkpoint, "\(directory)/\(i)") == LOLDU_OK)
            var config = loldu_config()
            #expect(loldu_checkpoint_layer(checkpoint, "encoder.q", nil, nil, nil, &config) == LOLDU_OK)
            var a: OpaquePointer?
            #expect(loldu_adapter_derive(&a, fresh.handle, &config) == LOLDU_OK)
            #expect(loldu_checkpoint_apply(checkpoint, "encoder.q", a) == LOLDU_OK, "\(i): \(String(cString: loldu_last_error()))")
            loldu_checkpoint_free(checkpoint)
            var z = [Float](repeating: .nan, count: saved[i].count)
            #expect(loldu_get_z(a, &z) == LOLDU_OK && z == saved[i])
            loaded.append(a!)
        }
        let states = loaded.map { adapterInfo($0).bytes_state }
        #expect(states.allSatisfy { $0 <= 4 * 9 }, "each adapter holds its z and σ only")
        #expect(Set(loaded.map { adapterInfo($0).bytes_weight }) == [adapterInfo(fresh.handle).bytes_weight])
    }
}

extension TestAdapter {
    /// A test adapter over a clone of `handle` (shares its factors; same z, σ, state).
    static func clone(_ handle: OpaquePointer) throws -> TestAdapter<T> {
        var copy: OpaquePointer?
        let status = loldu_adapter_clone(&copy, handle)
        guard status == LOLDU_OK, let copy else { throw LibraryError(status: status, message: String(cString: loldu_last_error())) }
        let info = adapterInfo(copy)
        return TestAdapter<T>(adopting: copy, m: Int(info.m), n: Int(info.n), rank: Int(info.rank))
    }
}

import CLoLDU
import Foundation
import Testing

/// Every exported function that takes a handle, called with NULL, a freed handle of its kind and
/// a live handle of each other kind: a status (a no-op for the free functions), never a crash,
/// and the object behind the wrong handle is left as it was.
@Suite struct HandleTests {
    enum Kind: String, CaseIterable, Sendable { case adapter, optimizer, checkpoint }

    struct Use: CustomStringConvertible, Sendable {
        let function: String
        let kind: Kind
        /// A free function: wrong handles are a no-op rather than a status.
        let frees: Bool
        let call: @Sendable (OpaquePointer?) -> loldu_status
        var description: String { "\(function)(\(kind))" }
    }

    static let x = [Float](repeating: 0.5, count: 64)

    static func use(_ function: String, _ kind: Kind, _ call: @escaping @Sendable (OpaquePointer?) -> loldu_status) -> Use {
        Use(function: function, kind: kind, frees: false, call: call)
    }

    static func free(_ function: String, _ kind: Kind, _ call: @escaping @Sendable (OpaquePointer?) -> Void) -> Use {
        Use(function: function, kind: kind, frees: true) { call($0); return LOLDU_OK }
    }

    /// One entry per (function, handle parameter) of include/loldu.h.
    static let uses: [Use] = [
        use("loldu_adapter_clone", .adapter) { h in var out: OpaquePointer?; let s = loldu_adapter_clone(&out, h); loldu_adapter_free(out); return s },
        free("loldu_adapter_free", .adapter) { loldu_adapter_free($0) },
        use("loldu_adapter_get_info", .adapter) { h in var i = loldu_adapter_info(); return loldu_adapter_get_info(h, &i, MemoryLayout<loldu_adapter_info>.size) },
        use("loldu_get_z", .adapter) { h in var z = [Float](repeating: 0, count: 8); return loldu_get_z(h, &z) },
        use("loldu_set_z", .adapter) { h in loldu_set_z(h, [Float](repeating: 1, count: 8)) },
        use("loldu_get_sigma", .adapter) { h in var s = 0.0; return loldu_get_sigma(h, &s) },
        use("loldu_set_sigma", .adapter) { h in loldu_set_sigma(h, 0.5) },
        use("loldu_params", .adapter) { h in var p: UnsafeMutableRawPointer?; return loldu_params(h, &p, nil) },
        use("loldu_bias_grad", .adapter) { h in var p: UnsafeMutableRawPointer?; return loldu_bias_grad(h, &p) },
        use("loldu_zero_grad", .adapter) { loldu_zero_grad($0) },
        use("loldu_get_factor", .adapter) { h in var o = [Float](repeating: 0, count: 64); return loldu_get_factor(h, LOLDU_FACTOR_DIAG, &o) },
        use("loldu_get_pivots", .adapter) { h in var p = [Int32](repeating: 0, count: 8); return loldu_get_pivots(h, &p) },
        use("loldu_forward", .adapter) { h in var y = [Float](repeating: 0, count: 64); return loldu_forward(h, 1, x, &y, nil) },
        use("loldu_forward_bias", .adapter) { h in var y = [Float](repeating: 0, count: 64); return loldu_forward_bias(h, 1, x, x, &y, nil) },
        use("loldu_backward", .adapter) { h in loldu_backward(h, 1, x, x, nil, nil) },
        use("loldu_backward_into", .adapter) { h in var g = [Float](repeating: 0, count: 9); return loldu_backward_into(h, 1, x, x, nil, nil, &g) },
        use("loldu_effective_weight", .adapter) { h in var w = [Float](repeating: 0, count: 64); return loldu_effective_weight(h, &w) },
        use("loldu_weight_backward", .adapter) { h in loldu_weight_backward(h, x) },
        use("loldu_merge", .adapter) { loldu_merge($0) },
        use("loldu_unmerge", .adapter) { loldu_unmerge($0) },
        use("loldu_set_enabled", .adapter) { loldu_set_enabled($0, 1) },
        use("loldu_set_path", .adapter) { loldu_set_path($0, LOLDU_PATH_AUTO) },
        use("loldu_plan", .adapter) { h in var p = LOLDU_PATH_AUTO; return loldu_plan(h, 4, 0, &p) },
        use("loldu_optimizer_create", .adapter) { h in
            var c = loldu_optimizer_config(), out: OpaquePointer?
            _ = loldu_optimizer_config_default(&c, LOLDU_SGD)
            let s = loldu_optimizer_create(&out, &c, [h], 1)
            loldu_optimizer_free(out)
            return s
        },
        use("loldu_checkpoint_save", .adapter) { h in
            withCStrings(["layer"]) { loldu_checkpoint_save(NSTemporaryDirectory() + "loldu-handle-test-never", [h], $0, 1) }
        },
        use("loldu_export_merged", .adapter) { h in
            withCStrings(["layer"]) { loldu_export_merged(NSTemporaryDirectory() + "loldu-handle-test-never.safetensors", [h], $0, 1) }
        },
        use("loldu_checkpoint_apply", .adapter) { h in
            var c: OpaquePointer?
            guard loldu_checkpoint_open(&c, HandleTests.checkpointDirectory) == LOLDU_OK else { return LOLDU_ERR_INTERNAL }
            defer { loldu_checkpoint_free(c) }
            return loldu_checkpoint_apply(c, "layer", h)
        },
        use("loldu_adapter_derive", .adapter) { h in
            var c = loldu_config(), out: OpaquePointer?
            _ = loldu_config_default(&c)
            c.rank = 2
            let s = loldu_adapter_derive(&out, h, &c)
            loldu_adapter_free(out)
            return s
        },
        use("loldu_adapter_convert", .adapter) { h in
            var out: OpaquePointer?
            let s = loldu_adapter_convert(&out, h, LOLDU_BFLOAT16)
            loldu_adapter_free(out)
            return s
        },
        use("loldu_grouped_forward", .adapter) { h in
            var y = [Float](repeating: 0, count: 64)
            return loldu_grouped_forward([h], 1, 1, [0], x, &y)
        },
        use("loldu_grouped_forward_bias", .adapter) { h in
            var y = [Float](repeating: 0, count: 64)
            return loldu_grouped_forward_bias([h], 1, 1, [0], x, x, &y)
        },
        use("loldu_grouped_backward", .adapter) { h in loldu_grouped_backward([h], 1, 1, [0], x, x, nil) },
        use("loldu_grouped_backward_into", .adapter) { h in
            var g = [Float](repeating: 0, count: 9)
            return g.withUnsafeMutableBytes { raw in
                let out: [UnsafeMutableRawPointer?] = [raw.baseAddress]
                return loldu_grouped_backward_into([h], 1, 1, [0], x, x, nil, out)
            }
        },
        use("loldu_get_coefficients", .adapter) { h in var c = [Float](repeating: 0, count: 8); return loldu_get_coefficients(h, &c) },
        use("loldu_export_lora", .adapter) { h in
            withCStrings(["layer"]) { loldu_export_lora(NSTemporaryDirectory() + "loldu-handle-test-never", [h], $0, 1, nil) }
        },
        use("loldu_weight_backward_into", .adapter) { h in var g = [Float](repeating: 0, count: 9); return loldu_weight_backward_into(h, x, &g) },
        free("loldu_optimizer_free", .optimizer) { loldu_optimizer_free($0) },
        use("loldu_optimizer_step", .optimizer) { loldu_optimizer_step($0, nil) },
        use("loldu_optimizer_zero_grad", .optimizer) { loldu_optimizer_zero_grad($0) },
        use("loldu_optimizer_get_lr", .optimizer) { h in var lr = 0.0; return loldu_optimizer_get_lr(h, &lr, nil) },
        use("loldu_optimizer_get_step", .optimizer) { h in var s: Int64 = 0; return loldu_optimizer_get_step(h, &s) },
        use("loldu_optimizer_save", .optimizer) { loldu_optimizer_save($0, NSTemporaryDirectory() + "loldu-handle-test-never") },
        use("loldu_optimizer_load", .optimizer) { loldu_optimizer_load($0, NSTemporaryDirectory() + "loldu-handle-test-never") },
        free("loldu_checkpoint_free", .checkpoint) { loldu_checkpoint_free($0) },
        use("loldu_checkpoint_count", .checkpoint) { h in var n = 0; return loldu_checkpoint_count(h, &n) },
        use("loldu_checkpoint_name", .checkpoint) { h in var n: UnsafePointer<CChar>?; return loldu_checkpoint_name(h, 0, &n) },
        use("loldu_checkpoint_layer", .checkpoint) { h in var m: Int64 = 0; return loldu_checkpoint_layer(h, "layer", nil, &m, nil, nil) },
        use("loldu_checkpoint_values", .checkpoint) { h in var s = 0.0; return loldu_checkpoint_values(h, "layer", nil, &s, nil, nil) },
        use("loldu_checkpoint_create", .checkpoint) { h in
            var out: OpaquePointer?
            let s = loldu_checkpoint_create(&out, h, "layer", NSTemporaryDirectory() + "loldu-handle-test-never")
            loldu_adapter_free(out)
            return s
        },
        use("loldu_merge_model", .checkpoint) { h in
            loldu_merge_model(NSTemporaryDirectory() + "loldu-handle-test-never", NSTemporaryDirectory(), h, nil)
        },
        use("loldu_checkpoint_apply", .checkpoint) { h in
            var random = TestRandom(1)
            guard let a = try? TestAdapter<Float>(m: 8, n: 8, weight: random.array(64)) else { return LOLDU_ERR_INTERNAL }
            return loldu_checkpoint_apply(h, "layer", a.handle)
        },
    ]

    /// A checkpoint of one 8 × 8 rank-8 layer named "layer", for the checkpoint handles.
    static let checkpointDirectory: String = {
        let directory = try! temporaryDirectory()
        var random = TestRandom(1)
        let a = try! TestAdapter<Float>(m: 8, n: 8, weight: random.array(64)) { $0.rank = 8 }
        _ = withCStrings(["layer"]) { loldu_checkpoint_save(directory, [a.handle], $0, 1) }
        return directory
    }()

    /// Live objects of every kind, and freed handles of every kind.
    final class Objects {
        var live: [Kind: OpaquePointer] = [:]
        var freed: [Kind: OpaquePointer] = [:]
        let adapter: TestAdapter<Float>

        init() throws {
            var random = TestRandom(2)
            adapter = try TestAdapter<Float>(m: 8, n: 8, weight: random.array(64)) { $0.rank = 8 }
            for pass in 0..<2 {
                var a: OpaquePointer?, o: OpaquePointer?, c: OpaquePointer?, config = loldu_optimizer_config()
                #expect(loldu_adapter_clone(&a, adapter.handle) == LOLDU_OK)
                _ = loldu_optimizer_config_default(&config, LOLDU_SGD)
                #expect(loldu_optimizer_create(&o, &config, [adapter.handle], 1) == LOLDU_OK)
                #expect(loldu_checkpoint_open(&c, HandleTests.checkpointDirectory) == LOLDU_OK)
                if pass == 0 {
                    live = [.adapter: a!, .optimizer: o!, .checkpoint: c!]
                } else {
                    freed = [.adapter: a!, .optimizer: o!, .checkpoint: c!]
                    loldu_adapter_free(a)
                    loldu_optimizer_free(o)
                    loldu_checkpoint_free(c)
                }
            }
        }

        deinit {
            loldu_adapter_free(live[.adapter])
            loldu_optimizer_free(live[.optimizer])
            loldu_checkpoint_free(live[.checkpoint])
        }

        /// Whether the live object of `kind` still answers as itself.
        func alive(_ kind: Kind) -> Bool {
            switch kind {
            case .adapter:
                var info = loldu_adapter_info()
                return loldu_adapter_get_info(live[kind], &info, MemoryLayout<loldu_adapter_info>.size) == LOLDU_OK && info.rank == 8
            case .optimizer:
                var steps: Int64 = -1
                return loldu_optimizer_get_step(live[kind], &steps) == LOLDU_OK
            case .checkpoint:
                var count = 0
                return loldu_checkpoint_count(live[kind], &count) == LOLDU_OK && count == 1
            }
        }
    }

    @Test(arguments: uses)
    func wrongNullAndFreedHandlesAreAnsweredAndHarmless(_ use: Use) throws {
        let objects = try Objects()
        let null = use.call(nil)
        if !use.frees { #expect(null == LOLDU_ERR_NULL_POINTER, "\(use) NULL: \(null.rawValue)") }
        let freed = use.call(objects.freed[use.kind])
        if !use.frees {
            #expect(freed == LOLDU_ERR_INVALID_HANDLE, "\(use) freed: \(freed.rawValue)")
            #expect(String(cString: loldu_last_error()).contains("not a live"))
        }
        for other in Kind.allCases where other != use.kind {
            let status = use.call(objects.live[other])
            if !use.frees {
                #expect(status == LOLDU_ERR_INVALID_HANDLE, "\(use) given a \(other): \(status.rawValue)")
                let message = String(cString: loldu_last_error())
                #expect(message.contains("is a loldu_\(other.rawValue) handle"), "\(use): \(message)")
            }
            #expect(objects.alive(other), "\(use) given a \(other) handle changed that \(other)")
        }
        for kind in Kind.allCases { #expect(objects.alive(kind)) }
    }

    /// The table above covers every handle parameter of every function in include/loldu.h.
    @Test func everyHandleParameterOfTheHeaderIsCovered() throws {
        let header = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("include/loldu.h")
        let text = try String(contentsOf: header, encoding: .utf8)
        let declaration = try NSRegularExpression(pattern: #"LOLDU_API [^;]*?(loldu_\w+)\(([^)]*)\)"#)
        var expected = Set<String>()
        for match in declaration.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
            let name = String(text[Range(match.range(at: 1), in: text)!])
            let parameters = String(text[Range(match.range(at: 2), in: text)!])
            for kind in Kind.allCases where parameters.range(of: "loldu_\(kind.rawValue) *", options: []) != nil
                || parameters.contains("loldu_\(kind.rawValue) *const") {
                // An out-parameter (`loldu_x **out`) creates a handle; it takes none.
                let inputs = parameters.components(separatedBy: ",").filter {
                    $0.contains("loldu_\(kind.rawValue) ") && !$0.contains("**")
                }
                if !inputs.isEmpty { expected.insert("\(name)(\(kind))") }
            }
        }
        let covered = Set(Self.uses.map(\.description))
        #expect(expected.count >= 35)
        #expect(expected.subtracting(covered).isEmpty, "not covered: \(expected.subtracting(covered).sorted())")
    }
}

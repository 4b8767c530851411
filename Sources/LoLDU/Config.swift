import CLoLDU

/// The library's version, from the public header's macros (the one place it is written).
public let libraryVersion = "\(LOLDU_VERSION_MAJOR).\(LOLDU_VERSION_MINOR).\(LOLDU_VERSION_PATCH)"

/// Element type of an adapter and of every buffer passed to it.
public enum DType: Int32, Sendable, CaseIterable {
    case float32 = 1   // LOLDU_FLOAT32
    case float64 = 2   // LOLDU_FLOAT64
    case bfloat16 = 3  // LOLDU_BFLOAT16
    case float16 = 4   // LOLDU_FLOAT16

    public var byteSize: Int {
        switch self {
        case .float32: 4
        case .float64: 8
        case .bfloat16, .float16: 2
        }
    }

    /// The largest finite value (float16 ends at 65504; bfloat16 near float32's end).
    var largestFinite: Double {
        switch self {
        case .float32: Double(Float.greatestFiniteMagnitude)
        case .float64: Double.greatestFiniteMagnitude
        case .bfloat16: Double(Float(bitPattern: 0x7F7F_0000))
        case .float16: 65504
        }
    }

    public var name: String {
        switch self {
        case .float32: "float32"
        case .float64: "float64"
        case .bfloat16: "bfloat16"
        case .float16: "float16"
        }
    }

    /// The type of the parameters, gradients and optimiser state of an adapter of this element
    /// type (and of every accumulation): float32 for the half types.
    public var parameterType: DType {
        switch self {
        case .float32, .bfloat16, .float16: .float32
        case .float64: .float64
        }
    }
}

/// Initialisation of the trainable diagonal `z` (names as in the reference code).
public enum ZInit: Int32, Sendable, CaseIterable {
    case lu = 0          // z = D_r
    case constant = 1    // z_k = mean(D_r)
    case uniform = 2     // U(-|μ|/2, |μ|/2), μ = mean(D_r)
    case normal = 3      // N(mean(D_r), std(D_r))
    case sUniform = 4    // U(-1, 1)
    case sNormal = 5     // N(0, 1)
    case ones = 6
    case zeros = 7

    public var name: String {
        switch self {
        case .lu: "lu"
        case .constant: "constant"
        case .uniform: "uniform"
        case .normal: "normal"
        case .sUniform: "s_uniform"
        case .sNormal: "s_normal"
        case .ones: "ones"
        case .zeros: "zeros"
        }
    }
}

/// What the frozen residual subtracts: `W_res = W − σ₀ · P L_r diag(z_ref) U_r`.
public enum Residual: Int32, Sendable, CaseIterable {
    case pivots = 0   // z_ref = D_r: the paper's behaviour
    case initial = 1  // z_ref = z₀: the output is unchanged at initialisation for every z init

    public var name: String {
        switch self {
        case .pivots: "pivots"
        case .initial: "init"
        }
    }
}

/// How forward and backward compute; `auto` picks by counting FLOPs for the shape and batch.
public enum ComputePath: Int32, Sendable, CaseIterable {
    case auto = 0
    case factored = 1      // y, dX and dz from the factors and the activations
    case merged = 2        // y and dX through the cached W_eff; dz from the activations
    case mergedWeightGrad = 3  // y and dX through W_eff; dz from the weight gradient dYᵀx

    public var name: String {
        switch self {
        case .auto: "auto"
        case .factored: "factored"
        case .merged: "merged"
        case .mergedWeightGrad: "merged_wgrad"
        }
    }
}

/// Everything that decides an adapter besides its weight. Validated by `validate(m:n:)`.
public struct AdapterConfig: Sendable, Equatable {
    /// `r`; `0` (the default) means full rank: `min(m, n)`, or the shared factors' rank for a
    /// derived adapter (see ``resolved(fullRank:)``).
    public var rank: Int = 0
    /// `σ = alpha / rank`; `0` means `alpha = rank`, so `σ = 1` (the paper's runs).
    public var alpha: Double = 0
    public var zInit: ZInit = .lu
    public var residual: Residual = .pivots
    public var seed: UInt64 = 0
    public var trainSigma: Bool = true
    /// Keep the caller's `W` instead of a copy (it must outlive the adapter, unchanged).
    public var borrowWeight: Bool = false

    public init() {}

    /// This configuration with rank `0` replaced by `fullRank`.
    func resolved(fullRank: Int) -> AdapterConfig {
        var c = self
        if c.rank == 0 { c.rank = fullRank }
        return c
    }

    public var effectiveAlpha: Double { alpha == 0 ? Double(rank) : alpha }
    public var sigma: Double { effectiveAlpha / Double(rank) }

    /// Why σ₀ = alpha / rank cannot be a parameter of type `type` (not a finite nonzero value
    /// there), for a message after the configuration's name; nil when it can.
    func unusableSigma(as type: DType) -> String? {
        let value: Double
        switch type {
        case .float64: value = sigma
        default: value = Double(Float(sigma))
        }
        guard !value.isFinite || value == 0 else { return nil }
        return "alpha = \(effectiveAlpha) gives sigma = alpha / rank = \(sigma), which is not a finite nonzero \(type.name)"
    }

    public func validate(m: Int, n: Int) throws(LoLDUError) {
        let k = min(m, n)
        guard rank >= 0, rank <= k else {
            throw .invalid("config.rank must be 0 (full rank) or in [1, min(m, n)] = [1, \(k)], got \(rank)")
        }
        guard alpha.isFinite, alpha >= 0 else {
            throw .invalid("config.alpha must be finite and >= 0 (0 means alpha = rank), got \(alpha)")
        }
    }
}

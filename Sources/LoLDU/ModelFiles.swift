import Glibc

/// A model directory as transformers writes it: `config.json`, the weights in
/// `model.safetensors` or in shards listed by `model.safetensors.index.json` (its `weight_map`
/// gives each tensor's file), and other files (tokenizer, ...).
///
/// The safetensors files are kept open: only their headers are read and validated when the
/// directory is opened; a tensor is read when it is used.
///
/// **Layer names → tensor names.** A layer `NAME` (its name in the adapted model) has its weight
/// in the tensor
/// 1. `NAME.weight`, if there is one; else
/// 2. the one tensor whose name ends in `.NAME.weight`: the file names carry a prefix that the
///    layer names lack (`bert.encoder.layer.0…` in the file, `encoder.layer.0…` adapted); else
/// 3. `NAME` without its first components, as few as possible: the layer names carry a prefix
///    that the file lacks (`bert.encoder.layer.0…` adapted on a `BertForSequenceClassification`,
///    `encoder.layer.0…` in the `BertModel`'s file).
///
/// Its bias, if any, is the tensor of the same name ending in `.bias` instead of `.weight`.
public final class ModelFiles {
    static let singleFile = "model.safetensors"
    static let indexFile = "model.safetensors.index.json"
    public static let configFile = "config.json"
    /// The largest index file read.
    static let indexLimit = 1 << 28

    public let directory: String
    /// The weight files, in the order their names sort.
    public let shards: [String]
    public let files: [SafeTensors.File]
    /// The parsed index (nil for a single file).
    public let index: [String: JSON]?
    private let location: [String: (shard: Int, tensor: SafeTensors.Tensor)]

    public init(directory: String) throws(LoLDUError) {
        var info = stat()
        guard stat(directory, &info) == 0 else { throw AtomicFile.failure("cannot open", directory) }
        guard (info.st_mode & S_IFMT) == S_IFDIR else {
            throw LoLDUError(.io, "\"\(directory)\" is \(AtomicFile.kind(info.st_mode)), not a model directory")
        }
        self.directory = directory
        let indexPath = "\(directory)/\(Self.indexFile)"
        if let bytes = try AtomicFile.read(indexPath, limit: Self.indexLimit, missingOK: true) {
            func fail(_ message: String) -> LoLDUError { LoLDUError(.format, "\(indexPath): \(message)") }
            let json = try rethrowing { try bytes.withUnsafeBytes { raw in try JSON.parse(raw, what: indexPath) } }
            guard let index = json.object, let map = index["weight_map"]?.object else {
                throw fail("no \"weight_map\" object")
            }
            var wanted: [String: String] = [:]
            for (tensor, file) in map {
                guard let name = file.string else { throw fail("weight_map[\"\(tensor)\"] is not a file name") }
                guard !name.containsControlCharacter, !tensor.containsControlCharacter else {
                    throw fail("weight_map has an entry with a control character")
                }
                guard !name.isEmpty, !name.contains("/"), !name.hasPrefix(".") else {
                    throw fail("weight_map[\"\(tensor)\"] = \"\(name)\" is not a file name in this directory")
                }
                wanted[tensor] = name
            }
            shards = Set(wanted.values).sorted()
            files = try shards.map { name throws(LoLDUError) in try SafeTensors.open("\(directory)/\(name)") }
            // A name in two shards would be two tensors under one name: refused, not guessed.
            var holder: [String: Int] = [:]
            for (shard, file) in files.enumerated() {
                for tensor in file.order {
                    if let other = holder.updateValue(shard, forKey: tensor) {
                        throw LoLDUError(.format, "\(directory): tensor \"\(tensor)\" is in both \(shards[other]) and \(shards[shard]); a sharded model holds each tensor once")
                    }
                }
            }
            var location: [String: (Int, SafeTensors.Tensor)] = [:]
            for (tensor, name) in wanted {
                let shard = shards.firstIndex(of: name)!
                guard let found = files[shard].tensors[tensor] else {
                    throw LoLDUError(.format, "\(directory)/\(name): has no tensor \"\(tensor)\", which \(Self.indexFile) puts there (a truncated or replaced shard?)")
                }
                location[tensor] = (shard, found)
            }
            self.index = index
            self.location = location
        } else {
            let single = "\(directory)/\(Self.singleFile)"
            guard access(single, F_OK) == 0 else {
                throw LoLDUError(.io, "\"\(directory)\" has neither \(Self.singleFile) nor \(Self.indexFile); a model directory holds its weights in safetensors files")
            }
            shards = [Self.singleFile]
            files = [try SafeTensors.open(single)]
            index = nil
            location = files[0].tensors.mapValues { (0, $0) }
        }
    }

    /// The tensor `key` and the file that holds it.
    public func tensor(_ key: String) -> (file: SafeTensors.File, tensor: SafeTensors.Tensor)? {
        location[key].map { (files[$0.shard], $0.tensor) }
    }

    /// The name of layer `name`'s weight tensor (see the type), or a `mismatch` error.
    public func weightKey(layer name: String) throws(LoLDUError) -> String {
        if location["\(name).weight"] != nil { return "\(name).weight" }
        let suffix = ".\(name).weight"
        let prefixed = location.keys.filter { $0.hasSuffix(suffix) }.sorted()
        if prefixed.count == 1 { return prefixed[0] }
        if prefixed.count > 1 {
            throw LoLDUError(.mismatch, "layer \"\(name)\": several tensors end in \"\(suffix)\" in \(directory) (\(prefixed.prefix(3).joined(separator: ", "))); the layer names must say which")
        }
        var parts = name.split(separator: ".", omittingEmptySubsequences: false)
        while parts.count > 1 {
            parts.removeFirst()
            let key = parts.joined(separator: ".") + ".weight"
            if location[key] != nil { return key }
        }
        throw LoLDUError(.mismatch, "layer \"\(name)\": \(directory) has no tensor \"\(name).weight\", none ending in \"\(suffix)\", and none for the name without its leading components; is this the model the adapter was trained on?")
    }

    /// The base weight of layer `name`: its tensor's name, element type, shape, and the matrix
    /// `m × n` (`m` the first dimension, `n` the product of the others) widened exactly to the
    /// parameter type, in a new buffer.
    public struct Weight {
        public let key: String
        public let dtype: DType
        public let shape: [Int]
        public let m: Int
        public let n: Int
        /// `m · n` values of `dtype.parameterType`.
        public let values: HeapBuffer<UInt8>
    }

    /// `mismatch` for a tensor of a shape no layer weight has, `dtype` for one not of a float type.
    public func weight(layer name: String) throws(LoLDUError) -> Weight {
        let key = try weightKey(layer: name)
        let (file, tensor) = tensor(key)!
        guard let dtype = SafeTensors.dtype(named: tensor.dtype) else {
            throw LoLDUError(.dtype, "layer \"\(name)\": tensor \"\(key)\" has dtype \(tensor.dtype); LoLDU adapts F32, F64, BF16 and F16 weights")
        }
        guard tensor.shape.count >= 2, tensor.shape.allSatisfy({ $0 >= 1 }) else {
            throw LoLDUError(.mismatch, "layer \"\(name)\": tensor \"\(key)\" has shape \(tensor.shape); a weight has at least 2 dimensions, none empty")
        }
        let m = tensor.shape[0], n = tensor.shape.dropFirst().reduce(1, *)
        let type = dtype.parameterType
        let values = try file.read(tensor, as: dtype, to: type)
        return Weight(key: key, dtype: dtype, shape: tensor.shape, m: m, n: n, values: values)
    }

    /// Layer `name`'s bias (`m` values of its weight's parameter type), if the file has one;
    /// `mismatch` for another length, `dtype` for a type that is not a float type.
    public func bias(layer name: String, weight: Weight) throws(LoLDUError) -> HeapBuffer<UInt8>? {
        let key = String(weight.key.dropLast(".weight".count)) + ".bias"
        guard let (file, tensor) = tensor(key) else { return nil }
        guard let dtype = SafeTensors.dtype(named: tensor.dtype) else {
            throw LoLDUError(.dtype, "layer \"\(name)\": tensor \"\(key)\" has dtype \(tensor.dtype); a bias is F32, F64, BF16 or F16")
        }
        guard tensor.shape == [weight.m] else {
            throw LoLDUError(.mismatch, "layer \"\(name)\": tensor \"\(key)\" has shape \(tensor.shape); this layer's bias is [\(weight.m)]")
        }
        return try file.read(tensor, as: dtype, to: weight.dtype.parameterType)
    }
}

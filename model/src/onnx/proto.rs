//! The ONNX messages this crate writes (`onnx.proto`, IR version 8), with their field numbers,
//! built on [`crate::protobuf::Message`].

use crate::protobuf::Message;

/// ONNX IR version of the models written (the one of opset 17, ONNX 1.12).
pub const IR_VERSION: i64 = 8;
/// The default-domain operator set used.
pub const OPSET: i64 = 17;

/// `TensorProto.DataType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    Float = 1,
    Int64 = 7,
    Float16 = 10,
}

/// A constant tensor (an initializer) with its raw little-endian data.
pub fn tensor(name: &str, elem: ElemType, dims: &[usize], raw: &[u8]) -> Message {
    let mut t = Message::new();
    for &d in dims {
        t.varint(1, d as i64); // dims
    }
    t.varint(2, elem as i64); // data_type
    t.string(8, name); // name
    t.bytes(9, raw); // raw_data
    t
}

/// One dimension of a tensor type: a fixed size or a symbolic name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Named(String),
}

/// A graph input or output: `ValueInfoProto` with a tensor type.
pub fn value_info(name: &str, elem: ElemType, dims: &[Dim], doc: &str) -> Message {
    let mut shape = Message::new();
    for d in dims {
        let mut dim = Message::new();
        match d {
            Dim::Fixed(v) => dim.varint(1, *v as i64), // dim_value
            Dim::Named(s) => dim.string(2, s),         // dim_param
        };
        shape.message(1, &dim);
    }
    let mut tensor_type = Message::new();
    tensor_type.varint(1, elem as i64).message(2, &shape);
    let mut ty = Message::new();
    ty.message(1, &tensor_type); // TypeProto.tensor_type
    let mut v = Message::new();
    v.string(1, name).message(2, &ty);
    if !doc.is_empty() {
        v.string(3, doc);
    }
    v
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Float(f32),
    Int(i64),
    Str(String),
    Ints(Vec<i64>),
}

fn attribute(name: &str, a: &Attr) -> Message {
    let mut m = Message::new();
    m.string(1, name);
    match a {
        Attr::Float(f) => {
            m.float(2, *f).varint(20, 1);
        }
        Attr::Int(i) => {
            m.varint(3, *i).varint(20, 2);
        }
        Attr::Str(s) => {
            m.bytes(4, s.as_bytes()).varint(20, 3);
        }
        Attr::Ints(v) => {
            for i in v {
                m.varint(8, *i);
            }
            m.varint(20, 7);
        }
    }
    m
}

/// A `NodeProto` of the default domain.
pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: &[(&str, Attr)]) -> Message {
    let mut n = Message::new();
    for i in inputs {
        n.string(1, i);
    }
    for o in outputs {
        n.string(2, o);
    }
    n.string(3, name).string(4, op);
    for (k, a) in attrs {
        n.message(5, &attribute(k, a));
    }
    n
}

/// A `GraphProto`.
pub struct Graph {
    pub name: String,
    pub doc: String,
    pub nodes: Vec<Message>,
    pub initializers: Vec<Message>,
    pub inputs: Vec<Message>,
    pub outputs: Vec<Message>,
}

impl Graph {
    fn encode(&self) -> Message {
        let mut g = Message::new();
        for n in &self.nodes {
            g.message(1, n);
        }
        g.string(2, &self.name);
        for t in &self.initializers {
            g.message(5, t);
        }
        if !self.doc.is_empty() {
            g.string(10, &self.doc);
        }
        for i in &self.inputs {
            g.message(11, i);
        }
        for o in &self.outputs {
            g.message(12, o);
        }
        g
    }
}

/// A `ModelProto` of `graph`, opset [`OPSET`], with `metadata` as `metadata_props`.
pub fn model(graph: &Graph, producer: &str, version: &str, doc: &str, metadata: &[(String, String)]) -> Vec<u8> {
    let mut m = Message::new();
    m.varint(1, IR_VERSION);
    m.string(2, producer).string(3, version);
    if !doc.is_empty() {
        m.string(6, doc);
    }
    m.message(7, &graph.encode());
    let mut opset = Message::new();
    opset.string(1, "").varint(2, OPSET);
    m.message(8, &opset);
    for (k, v) in metadata {
        let mut e = Message::new();
        e.string(1, k).string(2, v);
        m.message(14, &e);
    }
    m.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protobuf::read::{self, Value};

    #[test]
    fn nodes_and_tensors_have_onnx_field_numbers() {
        let n = node(
            "Conv",
            "c",
            &["x", "w"],
            &["y"],
            &[("strides", Attr::Ints(vec![2, 2])), ("epsilon", Attr::Float(0.5))],
        );
        let f = read::fields(n.as_bytes()).unwrap();
        assert_eq!(read::strings(&f, 1), ["x", "w"]);
        assert_eq!(read::strings(&f, 2), ["y"]);
        assert_eq!(read::strings(&f, 4), ["Conv"]);
        let attrs = read::bytes(&f, 5);
        let a0 = read::fields(attrs[0]).unwrap();
        assert_eq!(read::strings(&a0, 1), ["strides"]);
        assert_eq!(read::all(&a0, 8), [Value::Varint(2), Value::Varint(2)]);
        assert_eq!(read::all(&a0, 20), [Value::Varint(7)], "type INTS");
        let a1 = read::fields(attrs[1]).unwrap();
        assert_eq!(read::all(&a1, 2), [Value::Fixed32(0.5f32.to_bits())]);

        let t = tensor("w", ElemType::Float16, &[2, 3], &[0; 12]);
        let f = read::fields(t.as_bytes()).unwrap();
        assert_eq!(read::all(&f, 1), [Value::Varint(2), Value::Varint(3)]);
        assert_eq!(read::all(&f, 2), [Value::Varint(10)]);
        assert_eq!(read::bytes(&f, 9)[0].len(), 12);

        let g = Graph {
            name: "g".into(),
            doc: String::new(),
            nodes: vec![n],
            initializers: vec![t],
            inputs: vec![],
            outputs: vec![],
        };
        let bytes = model(&g, "p", "1", "", &[("k".into(), "v".into())]);
        let f = read::fields(&bytes).unwrap();
        assert_eq!(read::all(&f, 1), [Value::Varint(8)]);
        let opset = read::fields(read::bytes(&f, 8)[0]).unwrap();
        assert_eq!(read::all(&opset, 2), [Value::Varint(17)]);
        let meta = read::fields(read::bytes(&f, 14)[0]).unwrap();
        assert_eq!((read::strings(&meta, 1), read::strings(&meta, 2)), (vec!["k".into()], vec!["v".into()]));
    }
}

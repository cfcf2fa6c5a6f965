//! A small graph builder: nodes whose outputs are named after the node, and initializers from
//! candle tensors in the graph's float type.

use candle_core::{DType, Tensor};

use super::proto::{self, Attr, ElemType};
use crate::error::{CandleContext, Result};
use crate::protobuf::Message;

/// The float type of an exported graph's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    /// Weights, input and output in float16; the GroupNorm statistics in float32.
    F16,
}

impl Precision {
    pub fn elem(self) -> ElemType {
        match self {
            Precision::F32 => ElemType::Float,
            Precision::F16 => ElemType::Float16,
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "float32",
            Precision::F16 => "float16",
        }
    }
}

/// Nodes and initializers under construction.
pub struct Builder {
    pub precision: Precision,
    pub nodes: Vec<Message>,
    pub initializers: Vec<Message>,
}

/// Raw little-endian bytes of a tensor in `dtype` (f32 or f16).
fn raw(t: &Tensor, dtype: DType) -> candle_core::Result<Vec<u8>> {
    let t = t.to_device(&candle_core::Device::Cpu)?.to_dtype(dtype)?.flatten_all()?;
    Ok(match dtype {
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        _ => t.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

impl Builder {
    pub fn new(precision: Precision) -> Self {
        Builder { precision, nodes: Vec::new(), initializers: Vec::new() }
    }

    /// Add node `name` of `op`; its single output is `name` too, and is returned.
    pub fn op(&mut self, op: &str, name: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        self.nodes.push(proto::node(op, name, inputs, &[name], attrs));
        name.to_string()
    }

    /// A node whose output is named `output` (the graph's outputs).
    pub fn op_into(&mut self, op: &str, name: &str, inputs: &[&str], output: &str, attrs: &[(&str, Attr)]) {
        self.nodes.push(proto::node(op, name, inputs, &[output], attrs));
    }

    /// A weight in the graph's float type, under `name`.
    pub fn weight(&mut self, name: &str, t: &Tensor) -> Result<String> {
        self.weight_as(name, t, self.precision)
    }

    /// A weight in `precision`, whatever the graph's.
    pub fn weight_as(&mut self, name: &str, t: &Tensor, precision: Precision) -> Result<String> {
        let bytes = raw(t, precision.dtype()).ctx(|| name.to_string())?;
        self.initializers.push(proto::tensor(name, precision.elem(), t.dims(), &bytes));
        Ok(name.to_string())
    }

    /// A constant float tensor (values in f32) in `precision`.
    pub fn constant(&mut self, name: &str, dims: &[usize], values: &[f32], precision: Precision) -> String {
        let bytes: Vec<u8> = match precision {
            Precision::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Precision::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        };
        self.initializers.push(proto::tensor(name, precision.elem(), dims, &bytes));
        name.to_string()
    }

    /// A constant int64 tensor.
    pub fn constant_i64(&mut self, name: &str, values: &[i64]) -> String {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(proto::tensor(name, ElemType::Int64, &[values.len()], &bytes));
        name.to_string()
    }
}

//! Observation taps: the forward pass offers each intermediate tensor under its
//! canonical site name (`crate::sites`) to an optional [`Capture`]. With no capture the
//! taps cost one branch each: no name is formatted and nothing is cloned.

use candle_core::Tensor;

/// Tensors captured during one forward call, in forward order.
#[derive(Debug, Default, Clone)]
pub struct Capture {
    pub entries: Vec<(String, Tensor)>,
}

impl Capture {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, site: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(n, _)| n == site).map(|(_, t)| t)
    }

    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }
}

/// Offers `t` to the capture, if any; `name` is only evaluated when capturing.
#[inline]
pub(crate) fn tap(cap: &mut Option<&mut Capture>, name: impl FnOnce() -> String, t: &Tensor) {
    if let Some(c) = cap.as_deref_mut() {
        c.entries.push((name(), t.clone()));
    }
}

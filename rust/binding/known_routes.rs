//! The route templates an ASGI middleware found, by the framework's route object.
//!
//! Starlette and FastAPI leave the route they matched in the scope; its template is found
//! by Python (`meterage._routes`), a frame and a few dict lookups per request. A route
//! with only one template (mounted once) has it for every request it matches: one slot,
//! picked by the route object's address, gives it natively. The slot holds the route
//! object, so no other object can take its address while it is remembered.

use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};
use std::sync::{Arc, Mutex};

/// Slots; an application with more routes than this has some found by Python each time.
const SLOTS: usize = 128;

/// A route object, and its template.
type Known = (Py<PyAny>, Arc<str>);

pub struct KnownRoutes {
    slots: Mutex<Vec<Option<Known>>>,
}

impl Default for KnownRoutes {
    fn default() -> Self {
        KnownRoutes {
            slots: Mutex::new((0..SLOTS).map(|_| None).collect()),
        }
    }
}

fn slot_of(route: &Bound<'_, PyAny>) -> usize {
    // Objects are at least 16 bytes apart: the low bits say nothing.
    (route.as_ptr() as usize >> 4) % SLOTS
}

impl KnownRoutes {
    /// The template remembered for `route`.
    pub fn get(&self, route: &Bound<'_, PyAny>) -> Option<Arc<str>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match &slots[slot_of(route)] {
            Some((known, template)) if known.as_ptr() == route.as_ptr() => {
                Some(Arc::clone(template))
            }
            _ => None,
        }
    }

    /// Remembers `route`'s only template.
    pub fn put(&self, route: &Bound<'_, PyAny>, template: Arc<str>) {
        let made = (route.clone().unbind(), template);
        // The slot's earlier route is dropped after the lock is let go (its last reference
        // may run Python code).
        let _earlier = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots[slot_of(route)].replace(made)
        };
    }

    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        // The collector runs between bytecodes: a thread holding the lock is not inside
        // it then, unless this thread is (and then it cannot be waited for).
        let Ok(slots) = self.slots.try_lock() else {
            return Ok(());
        };
        for (route, _) in slots.iter().flatten() {
            visit.call(route)?;
        }
        Ok(())
    }
}

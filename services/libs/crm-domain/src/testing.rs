//! Given events, when a command, then events or an error.
use jiff::Timestamp;

use crate::{Aggregate, Context, DomainError};

pub const NOW: &str = "2026-11-28T10:00:00Z";

pub fn now() -> Timestamp {
    NOW.parse().expect("valid timestamp")
}

pub struct Scenario<A: Aggregate> {
    state: A,
    context: Context,
}

pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Scenario<A> {
    let events: Vec<A::Event> = events.into_iter().collect();
    Scenario {
        state: A::default().replay(events.iter()),
        context: Context::at(now()),
    }
}

pub struct Outcome<A: Aggregate> {
    pub state: A,
    pub result: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> Scenario<A> {
    pub fn at(mut self, occurred_at: &str) -> Self {
        self.context.occurred_at = Some(occurred_at.parse().expect("valid timestamp"));
        self
    }

    pub fn when(self, command: A::Command) -> Outcome<A> {
        let result = self.state.decide(command, self.context);
        Outcome {
            state: self.state,
            result,
        }
    }
}

impl<A: Aggregate> Outcome<A> {
    #[track_caller]
    pub fn then(self, expected: Vec<A::Event>) -> A {
        let events = self.result.expect("the command was refused");
        assert_eq!(events, expected);
        self.state.replay(events.iter())
    }

    /// Accepted, whatever the events: the state after them.
    #[track_caller]
    pub fn then_ok(self) -> A {
        let events = self.result.expect("the command was refused");
        assert!(!events.is_empty(), "the command changed nothing");
        self.state.replay(events.iter())
    }

    #[track_caller]
    pub fn then_error(self, expected: DomainError) {
        assert_eq!(self.result.err(), Some(expected));
    }

    /// The refusal lists exactly these fields.
    #[track_caller]
    pub fn then_invalid(self, fields: &[&str]) {
        match self.result {
            Err(DomainError::Invalid(violations)) => {
                let got: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(got, fields);
            }
            other => panic!("expected invalid {fields:?}, got {other:?}"),
        }
    }
}

//! What every service actor does first: subscribe to its subjects and take their messages as
//! one stream, each turned into the actor's own message type. Done once here instead of in
//! each actor.

use actix::prelude::*;
use futures::stream::{BoxStream, StreamExt};

/// One subject an actor listens on.
pub struct Subscription<T> {
    subject: String,
    queue: Option<String>,
    tag: fn(async_nats::Message) -> T,
}

impl<T> Subscription<T> {
    /// Messages on `subject`, each wrapped by `tag` (typically an enum variant).
    pub fn new(subject: &str, tag: fn(async_nats::Message) -> T) -> Self {
        Self { subject: subject.to_string(), queue: None, tag }
    }

    /// The same, as a member of queue group `queue` (each message goes to one member).
    pub fn in_queue(subject: &str, queue: &str, tag: fn(async_nats::Message) -> T) -> Self {
        Self { subject: subject.to_string(), queue: Some(queue.to_string()), tag }
    }
}

/// Subscribes to every subject and merges their messages into one stream.
pub async fn subscribe_all<T: Send + 'static>(
    client: &async_nats::Client,
    subscriptions: Vec<Subscription<T>>,
) -> Result<BoxStream<'static, T>, async_nats::SubscribeError> {
    let mut streams = Vec::with_capacity(subscriptions.len());
    for Subscription { subject, queue, tag } in subscriptions {
        let subscriber = match queue {
            Some(queue) => client.queue_subscribe(subject, queue).await?,
            None => client.subscribe(subject).await?,
        };
        streams.push(subscriber.map(tag).boxed());
    }
    Ok(futures::stream::select_all(streams).boxed())
}

/// Subscribes `actor` to its subjects before it handles anything else; a failure stops the
/// process (exit code 1) with a message naming `service`.
pub fn listen<A, T>(
    actor: &A,
    ctx: &mut Context<A>,
    client: async_nats::Client,
    subscriptions: Vec<Subscription<T>>,
    service: &'static str,
) where
    A: Actor<Context = Context<A>> + StreamHandler<T>,
    T: Send + 'static,
{
    ctx.wait(async move { subscribe_all(&client, subscriptions).await }.into_actor(actor).map(
        move |result, _, ctx: &mut Context<A>| match result {
            Ok(stream) => {
                ctx.add_stream(stream);
            }
            Err(e) => {
                tracing::error!("{service}: cannot subscribe: {e}");
                System::current().stop_with_code(1);
            }
        },
    ));
}
